"""Which pod holds which GPU: a client of the kubelet's pod-resources API (v1).

The kubelet serves ``v1.PodResourcesLister`` on a unix socket
(``/var/lib/kubelet/pod-resources/kubelet.sock``); ``List`` returns every pod on the node
with, per container, the devices the device plugins allocated to it. For the NVIDIA device
plugin the resource is ``nvidia.com/gpu`` (``nvidia.com/mig-<profile>`` with the mixed MIG
strategy, ``nvidia.com/gpu.shared`` with renamed time-slicing replicas) and the device ids
are GPU UUIDs (``GPU-...``; ``GPU-...::<n>`` for a time-slicing replica), or indexes with
``DEVICE_ID_STRATEGY=index``.

The message classes are built at run time from a descriptor declared here (the fields of
``k8s.io/kubelet/pkg/apis/podresources/v1/api.proto`` this module reads; fields it does not
declare, such as topology, cpu_ids, memory and dynamic_resources, are skipped by the
parser), so neither generated ``_pb2`` files nor grpcio-tools are needed. grpcio and
protobuf come with the ``k8s`` extra and are imported only when a socket exists.
"""

from __future__ import annotations

import dataclasses
import functools
import os

DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
SOCKET_ENV = "STALLSCOPE_POD_RESOURCES_SOCKET"
SERVICE = "v1.PodResourcesLister"
LIST_METHOD = f"/{SERVICE}/List"
#: resource names whose devices are NVIDIA GPUs (prefixes)
GPU_RESOURCES = ("nvidia.com/gpu", "nvidia.com/mig-")
_MAX_MESSAGE = 16 << 20       # what the kubelet's own client allows; a large node's list fits


class PodResourcesError(RuntimeError):
    """The pod-resources API could not be asked (grpc missing, socket refusing, timeout).

    ``str()`` is one line; the caller logs it and keeps the previous mapping."""


@dataclasses.dataclass(frozen=True)
class Holder:
    """One container holding a device."""

    namespace: str
    pod: str
    container: str
    resource: str

    def to_json(self) -> dict:
        return {"namespace": self.namespace, "pod": self.pod, "container": self.container}


# ------------------------------------------------------------------ messages
_STRING, _INT64, _MESSAGE = 9, 3, 11            # FieldDescriptorProto.Type
_OPTIONAL, _REPEATED = 1, 3                     # FieldDescriptorProto.Label
#: message -> fields (name, number, type, label, message type)
_MESSAGES = {
    "ListPodResourcesRequest": [],
    "ListPodResourcesResponse": [("pod_resources", 1, _MESSAGE, _REPEATED, "PodResources")],
    "PodResources": [("name", 1, _STRING, _OPTIONAL, ""), ("namespace", 2, _STRING, _OPTIONAL, ""),
                     ("containers", 3, _MESSAGE, _REPEATED, "ContainerResources")],
    "ContainerResources": [("name", 1, _STRING, _OPTIONAL, ""),
                           ("devices", 2, _MESSAGE, _REPEATED, "ContainerDevices"),
                           ("cpu_ids", 3, _INT64, _REPEATED, "")],
    "ContainerDevices": [("resource_name", 1, _STRING, _OPTIONAL, ""),
                         ("device_ids", 2, _STRING, _REPEATED, "")],
}


@functools.lru_cache(maxsize=None)
def messages() -> dict:
    """{message name: class} for the declared part of the v1 API, in a private descriptor
    pool (so another ``v1`` package in the process cannot clash)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fp = descriptor_pb2.FileDescriptorProto(name="stallscope/podresources/v1/api.proto",
                                            package="v1", syntax="proto3")
    for name, fields in _MESSAGES.items():
        m = fp.message_type.add(name=name)
        for fname, num, ftype, label, tname in fields:
            f = m.field.add(name=fname, number=num, type=ftype, label=label)
            if tname:
                f.type_name = f".v1.{tname}"
    svc = fp.service.add(name="PodResourcesLister")
    svc.method.add(name="List", input_type=".v1.ListPodResourcesRequest",
                   output_type=".v1.ListPodResourcesResponse")
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(fp.SerializeToString())
    fd = pool.FindFileByName(fp.name)
    return {name: message_factory.GetMessageClass(fd.message_types_by_name[name]) for name in _MESSAGES}


# ------------------------------------------------------------------ client
def list_pods(socket_path: str = DEFAULT_SOCKET, timeout_s: float = 2.0):
    """``List`` once: the ``ListPodResourcesResponse`` message. Raises PodResourcesError."""
    try:
        import grpc
    except ImportError as e:
        raise PodResourcesError("pod-resources: grpcio is not installed "
                                "(pip install 'stallscope[k8s]')") from e
    msgs = messages()
    req_cls, resp_cls = msgs["ListPodResourcesRequest"], msgs["ListPodResourcesResponse"]
    target = "unix://" + os.path.abspath(socket_path)
    channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", _MAX_MESSAGE)])
    try:
        call = channel.unary_unary(LIST_METHOD, request_serializer=req_cls.SerializeToString,
                                   response_deserializer=resp_cls.FromString)
        return call(req_cls(), timeout=timeout_s)
    except grpc.RpcError as e:
        code = e.code().name if hasattr(e, "code") and e.code() is not None else "?"
        detail = (e.details() if hasattr(e, "details") else "") or ""
        raise PodResourcesError(f"pod-resources: List on {socket_path} failed: {code} "
                                f"{detail.splitlines()[0] if detail else ''}".rstrip()) from e
    finally:
        channel.close()


def device_key(device_id: str) -> str:
    """A device id as the GPUs are keyed: a time-slicing replica ``GPU-x::3`` is GPU ``GPU-x``."""
    return device_id.split("::", 1)[0]


def gpu_holders(response, resources=GPU_RESOURCES) -> dict:
    """{device key: [Holder]} for the GPU devices in a ``ListPodResourcesResponse`` (a shared
    GPU has several holders, each once)."""
    out: dict = {}
    for pod in response.pod_resources:
        for c in pod.containers:
            for dev in c.devices:
                if not dev.resource_name.startswith(resources):
                    continue
                h = Holder(pod.namespace, pod.name, c.name, dev.resource_name)
                for d in dev.device_ids:
                    lst = out.setdefault(device_key(d), [])
                    if h not in lst:
                        lst.append(h)
    return out
