"""The recorder of a real GPU's NVML answers (sources/nvml_record.py): what it writes can be
shared (no GPU identifiers, no host name) and holds NVML's structures as plain JSON."""

from __future__ import annotations

import pynvml

from pipeline.sources.nvml_record import jsonable, scrub


def test_scrub_replaces_a_gpus_identifiers_and_the_host_name():
    text = "\n".join([
        "    Serial Number                         : 1654024075500",
        "    GPU UUID                              : GPU-a5f6a5ad-cf9d-09cb-0ace-24344be35374",
        "    GPU PDI                               : 0x1f2e3d4c5b6a7988",
        '{"gpu_uuid": "GPU-1B264AB3-2BF7-9617-38FA-0C8F7F2220AA", "serial": "1654024075500"}',
        'DCGM_FI_DEV_GPU_TEMP{Hostname="dgx-a17",UUID="GPU-ddc9d1a0-fa8a-d64d-be07-4a7424887d9c"} 37.0',
        "Fleetwatch on dgx-a17:9410 is healthy; dgx-a170 is another host",
        'NVML agent on dgx-a17.example.com, bus in-process; {"node": "dgx-a17", "rack": "dgx-a17-rack"}',
    ])
    out = scrub(text, host="dgx-a17.example.com")
    for secret in ("1654024075500", "a5f6a5ad", "1B264AB3", "ddc9d1a0", "0x1f2e3d4c5b6a7988", 'Hostname="dgx-a17"',
                   "on dgx-a17:", "dgx-a17.example.com", '"node": "dgx-a17"'):
        assert secret not in out
    assert out.count("GPU-00000000-0000-4000-8000-000000000001") == 3 and out.count("0000000000001") == 2
    assert 'Hostname="gpu-node"' in out and "dgx-a170 is another host" in out  # a whole name only
    assert '"rack": "dgx-a17-rack"' in out  # where no host's name is written, nothing changes


def test_a_host_named_like_a_word_changes_no_word():
    text = '{"gpu": 0, "node": "gpu", "t": 0.1, "phase": "load"} NVML agent on gpu: driver 580'
    assert scrub(text, host="gpu") == ('{"gpu": 0, "node": "gpu-node", "t": 0.1, "phase": "load"} '
                                       'NVML agent on gpu-node: driver 580')
    assert scrub('{"t": 0.1, "phase": "idle"}', host="t") == '{"t": 0.1, "phase": "idle"}'


def test_nvml_structures_become_plain_json():
    util = pynvml.c_nvmlUtilization_t(gpu=99, memory=25)
    assert jsonable(util) == {"gpu": 99, "memory": 25}
    assert jsonable([b"96.00.A5.00.1A", (9, 0)]) == ["96.00.A5.00.1A", [9, 0]]
