"""The kubelet pod-resources client against a real gRPC server on a unix socket serving canned
pods, the GPU -> pod mapping the tracer ships, and the job-mapping reader beside it."""

import concurrent.futures
import os

import grpc
import pytest

from stallscope.tracer import podresources
from stallscope.tracer.attribution import GpuAttribution

GPU0 = "GPU-604ac76c-d9cf-fef3-62e9-d92044ab6e52"
GPU1 = "GPU-2812eb50-852a-8049-1257-d447ce043b27"
GPU2 = "GPU-c78d556a-38ea-a307-20b5-e0548e6169d1"
GPUS = [{"index": 0, "uuid": GPU0, "name": "H200"}, {"index": 1, "uuid": GPU1, "name": "H200"},
        {"index": 2, "uuid": GPU2, "name": "H200"}]


def canned_response():
    """What a kubelet lists: a training pod with two GPUs in one container, a time-sliced GPU
    shared by two pods (replica ids GPU-x::n), a CPU-only pod, a MIG instance, and a
    container holding another device plugin's resource."""
    m = podresources.messages()
    r = m["ListPodResourcesResponse"]()
    p = r.pod_resources.add(name="llama-train-0", namespace="ml")
    c = p.containers.add(name="trainer", cpu_ids=[2, 3])
    c.devices.add(resource_name="nvidia.com/gpu", device_ids=[GPU0, GPU1])
    c.devices.add(resource_name="rdma/hca_shared_devices_a", device_ids=["mlx5_0"])
    p.containers.add(name="sidecar")
    for name, replica in (("notebook-a", 0), ("notebook-b", 3)):
        q = r.pod_resources.add(name=name, namespace="research")
        q.containers.add(name="jupyter").devices.add(resource_name="nvidia.com/gpu.shared",
                                                     device_ids=[f"{GPU2}::{replica}"])
    r.pod_resources.add(name="coredns-5d78c9869d-abcde", namespace="kube-system").containers.add(name="coredns")
    mig = r.pod_resources.add(name="infer-0", namespace="serve").containers.add(name="server")
    mig.devices.add(resource_name="nvidia.com/mig-1g.10gb", device_ids=["MIG-dc34c2fd-4bd7-52ad-a6d0-645dcd1794e4"])
    return r


class Kubelet:
    """A gRPC server speaking v1.PodResourcesLister on a unix socket."""

    def __init__(self, path, response=None, code=None):
        m = podresources.messages()
        self.calls = 0
        self.response = response if response is not None else canned_response()
        self.code = code

        def list_(request, context):
            self.calls += 1
            if self.code is not None:
                context.abort(self.code, "pod resources unavailable")
            return self.response

        handler = grpc.method_handlers_generic_handler(podresources.SERVICE, {
            "List": grpc.unary_unary_rpc_method_handler(
                list_, request_deserializer=m["ListPodResourcesRequest"].FromString,
                response_serializer=m["ListPodResourcesResponse"].SerializeToString)})
        self.server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
        self.server.add_generic_rpc_handlers((handler,))
        assert self.server.add_insecure_port(f"unix://{path}") == 1
        self.server.start()

    def stop(self):
        self.server.stop(None)


@pytest.fixture
def kubelet(tmp_path):
    sock = tmp_path / "pod-resources" / "kubelet.sock"
    sock.parent.mkdir()
    k = Kubelet(str(sock))
    k.path = str(sock)
    yield k
    k.stop()


def test_list_over_a_unix_socket(kubelet):
    resp = podresources.list_pods(kubelet.path)
    assert [p.name for p in resp.pod_resources] == ["llama-train-0", "notebook-a", "notebook-b",
                                                     "coredns-5d78c9869d-abcde", "infer-0"]
    assert list(resp.pod_resources[0].containers[0].cpu_ids) == [2, 3]


def test_gpu_holders_keep_gpu_resources_and_fold_replicas(kubelet):
    h = podresources.gpu_holders(podresources.list_pods(kubelet.path))
    assert set(h) == {GPU0, GPU1, GPU2, "MIG-dc34c2fd-4bd7-52ad-a6d0-645dcd1794e4"}
    assert [(x.namespace, x.pod, x.container) for x in h[GPU0]] == [("ml", "llama-train-0", "trainer")]
    assert [x.pod for x in h[GPU2]] == ["notebook-a", "notebook-b"]
    assert "mlx5_0" not in h


def test_attribution_maps_gpus_to_pods_and_refreshes_at_most_every_period(kubelet, tmp_path):
    logs = []
    a = GpuAttribution(GPUS, kubelet.path, str(tmp_path / "no-job-dir"), refresh_s=3600, log=logs.append)
    assert a.refresh()
    assert not a.refresh()                        # within the period: no second List
    assert kubelet.calls == 1
    meta = a.annotate({"gpus": GPUS, "driver": "580"})
    by = {g["index"]: g for g in meta["gpus"]}
    assert by[0]["pods"] == [{"namespace": "ml", "pod": "llama-train-0", "container": "trainer"}]
    assert by[1]["pods"] == by[0]["pods"]
    assert [p["pod"] for p in by[2]["pods"]] == ["notebook-a", "notebook-b"]
    assert meta["unmatched_devices"] == ["MIG-dc34c2fd-4bd7-52ad-a6d0-645dcd1794e4"]
    assert meta["driver"] == "580" and "pods" not in GPUS[0]       # input left alone
    assert any("no-job-dir absent" in m for m in logs)
    assert a.refresh(force=True) and kubelet.calls == 2


def test_index_device_ids(tmp_path):
    """DEVICE_ID_STRATEGY=index: the plugin's ids are GPU indexes."""
    m = podresources.messages()
    r = m["ListPodResourcesResponse"]()
    r.pod_resources.add(name="p", namespace="n").containers.add(name="c").devices.add(
        resource_name="nvidia.com/gpu", device_ids=["2"])
    sock = str(tmp_path / "k.sock")
    k = Kubelet(sock, response=r)
    try:
        a = GpuAttribution(GPUS, sock, str(tmp_path), refresh_s=0)
        a.refresh()
        assert a.for_gpu(2) == {"pods": [{"namespace": "n", "pod": "p", "container": "c"}]}
        assert a.for_gpu(0) == {}
    finally:
        k.stop()


def test_absent_socket_is_one_log_line_and_no_mapping(tmp_path):
    logs = []
    a = GpuAttribution(GPUS, str(tmp_path / "kubelet.sock"), str(tmp_path / "jobs"), refresh_s=0, log=logs.append)
    for _ in range(3):
        a.refresh()
    assert a.pods == {} and a.errors == 0
    assert sum("kubelet.sock absent" in m for m in logs) == 1


def test_failing_kubelet_is_counted_keeps_the_last_mapping(tmp_path):
    sock = str(tmp_path / "k.sock")
    k = Kubelet(sock)
    logs = []
    try:
        a = GpuAttribution(GPUS, sock, str(tmp_path), refresh_s=0, log=logs.append)
        a.refresh()
        assert a.for_gpu(0)["pods"][0]["pod"] == "llama-train-0"
        k.code = grpc.StatusCode.UNAVAILABLE
        a.refresh()
        a.refresh()
        assert a.errors == 2 and a.for_gpu(0)["pods"][0]["pod"] == "llama-train-0"
        assert sum("UNAVAILABLE" in m for m in logs) == 1
    finally:
        k.stop()


def test_socket_that_is_not_a_server(tmp_path):
    """A stale socket file (kubelet down): a one-line error, not a hang."""
    import socket
    path = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()
    with pytest.raises(podresources.PodResourcesError) as e:
        podresources.list_pods(path, timeout_s=0.5)
    assert "\n" not in str(e.value) and "List on" in str(e.value)
    assert os.path.exists(path)
