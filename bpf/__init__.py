"""The kernel side: BPF programs in C, shipped as package data of ``stallscope.bpf``.

``stallscope.h`` is the record contract both sides share; ``stallscope.wire.schema``
parses it. ``BPF_DIR`` is where the sources lie, installed or in a checkout.
"""

import os

BPF_DIR = os.path.dirname(os.path.abspath(__file__))
