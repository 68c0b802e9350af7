"""`python -m stallscope ...` is the `stallscope` command."""

from stallscope.main import main

main()
