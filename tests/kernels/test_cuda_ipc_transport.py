"""cuda_ipc transport: a packed KV buffer crosses to a second process on the same GPU."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from cluster.transport.cuda_ipc import CudaIpcTransport


def _receiver(q_out, q_in) -> None:
    t = CudaIpcTransport("decode-0")
    q_out.put(t.listen())
    group_id, transfer_id, shape, dtype = q_in.get(timeout=60)
    buf = t.recv(group_id, transfer_id, shape, dtype, timeout_s=30)
    assert buf.device.type == "cuda"  # a copy in this process's memory
    q_out.put(buf.cpu())  # what arrived, for the sender to compare
    q_in.get(timeout=60)  # the sender is done with our store: close it only now
    t.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_refuses_to_start_without_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        CudaIpcTransport("r0")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_two_process_transfer_of_gathered_blocks():
    from kernels.kv_pack import gather_blocks

    ctx = mp.get_context("spawn")
    q_out, q_in = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_receiver, args=(q_out, q_in))
    proc.start()
    try:
        endpoint = q_out.get(timeout=120)
        cache = torch.randn(2, 2, 8, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
        buf = gather_blocks(cache, [5, 1, 6])
        sender = CudaIpcTransport("prefill-0")
        handle = sender.send(endpoint, 7, buf)
        q_in.put((handle.result.group_id, 7, handle.result.shape, buf.dtype))
        handle.wait(timeout_s=30)
        got = q_out.get(timeout=60)
        q_in.put("done")
        assert torch.equal(got, buf.cpu())
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
