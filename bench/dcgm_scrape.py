"""Scrape throughput of the DCGM exporter source: GPUs per second one process reads from
dcgm-exporter endpoints, against parsing alone.

SERVERS local HTTP servers (tests/dcgm_exporter.py: threads of one other process, keep-alive,
each serving an 8-GPU H100 exposition as dcgm-exporter 4.x writes it, 40 KB) are scraped by
the DCGM source's real code, DcgmSource.round(): aiohttp, `concurrency` in flight, parsing in
its worker thread, one gpu_samples batch per round. Measured in one run:
  reference  prometheus_client's parser alone on the same text (text_string_to_metric_families),
             then the rows: what the source would cost without its fast path
  parse      the source's parser alone (parse_exposition + rows): the floor without HTTP
  source     whole rounds over HTTP: GPUs/s of wall time, and per CPU-second of this process
             (the servers run in another process)

    python bench/dcgm_scrape.py [--servers 200] [--rounds 20] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pipeline.config import load_config  # noqa: E402
from pipeline.sources.dcgm import DcgmSource, Target, TargetState, parse_exposition  # noqa: E402


def serve(n: int, conn, stop) -> None:
    from tests.dcgm_exporter import DcgmExporter
    servers = [DcgmExporter(hostname=f"gpu-node-{i:04d}", tag=i, static=True) for i in range(n)]
    conn.send([s.url for s in servers])
    stop.wait()
    for s in servers:
        s.close()


def timed(step, n: int) -> tuple[float, float]:
    """(wall s, CPU s) per call."""
    w, c = time.perf_counter(), time.process_time()
    for _ in range(n):
        step()
    return (time.perf_counter() - w) / n, (time.process_time() - c) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--servers", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--concurrency", type=int, default=64)
    args = ap.parse_args()

    from tests.dcgm_exporter import DcgmExporter
    sample = DcgmExporter(static=True)
    text = sample.render()
    sample.close()
    cfg = load_config(env={}, overrides={"dcgm": {"targets": ["x:1"], "concurrency": args.concurrency,
                                                  "timeout_s": 30.0}}).dcgm
    one = DcgmSource(cfg, [], {})
    target = Target("http://gpu-node-0:9400/metrics")
    n_parse = 300
    # (a new target state each time: the same reading again would be left out as not read anew)
    ref_wall, ref_cpu = timed(lambda: one.rows(TargetState(target), parse_exposition(text, fast=False), 0),
                              n_parse // 3)
    parse_wall, parse_cpu = timed(lambda: one.rows(TargetState(target), parse_exposition(text), 0), n_parse)
    gpus = len(parse_exposition(text).uuids)

    stop = mp.Event()
    here, there = mp.Pipe()
    proc = mp.Process(target=serve, args=(args.servers, there, stop), daemon=True)
    proc.start()
    urls = here.recv()
    src = DcgmSource(cfg, [Target(u) for u in urls], {})

    async def rounds() -> tuple[float, float, int]:
        import aiohttp
        limit = asyncio.Semaphore(args.concurrency)
        connector = aiohttp.TCPConnector(limit=args.concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            await src.round(session, limit)  # warm: connections open, first parse
            w, c = time.perf_counter(), time.process_time()
            read = src.gpu_samples + src.unrefreshed  # (static servers: a reading served again is left out)
            for _ in range(args.rounds):
                await src.round(session, limit)
            return time.perf_counter() - w, time.process_time() - c, src.gpu_samples + src.unrefreshed - read
    wall, cpu, rows = asyncio.run(rounds())
    stop.set()
    proc.join(10)
    failed = src.stats()["scrape_failures"]

    print(f"{os.cpu_count()} CPUs; {args.servers} servers x {gpus} GPUs ({len(text) / 1024:.0f} KB each), "
          f"{args.rounds} rounds, concurrency {args.concurrency}; {failed} failed scrapes")
    print(f"reference parser alone   {ref_cpu * 1e3:6.2f} ms CPU per exposition = {gpus / ref_cpu:9,.0f} GPUs/CPU-s")
    print(f"source's parser alone    {parse_cpu * 1e3:6.2f} ms CPU per exposition = {gpus / parse_cpu:9,.0f} GPUs/CPU-s"
          f"  ({ref_cpu / parse_cpu:.1f}x the reference)")
    print(f"source over HTTP         {wall / args.rounds * 1e3:6.0f} ms per round of {args.servers} targets = "
          f"{rows / wall:9,.0f} GPUs/s wall, {rows / cpu:9,.0f} GPUs/CPU-s of this process "
          f"({rows / cpu / (gpus / parse_cpu):.2f}x parsing alone)")


if __name__ == "__main__":
    main()
