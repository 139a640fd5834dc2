"""sockio: stdlib socket calls under trio, waiting only when they would block."""

from __future__ import annotations

import socket

import trio
import trio.lowlevel

from ollama_proxy.http import sockio


async def test_raw_socket_is_the_stdlib_socket_inside() -> None:
    a, b = trio.socket.socketpair()
    with a, b:
        raw = sockio.raw_socket(a)
        assert type(raw) is socket.socket
        assert raw.fileno() == a.fileno()


async def test_recv_waits_for_data_and_send_all_writes_everything() -> None:
    a, b = trio.socket.socketpair()
    with a, b:
        ra, rb = sockio.raw_socket(a), sockio.raw_socket(b)
        big = bytes(range(256)) * 8192  # 2 MiB: more than a socket buffer holds
        got = bytearray()

        async def reader() -> None:
            while len(got) < len(big):
                got.extend(await sockio.recv(rb, 65536, wait_first=not got))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await sockio.send_all(ra, big)
        assert bytes(got) == big


async def test_calls_that_never_block_still_yield_to_other_tasks() -> None:
    a, b = trio.socket.socketpair()
    with a, b:
        ra, rb = sockio.raw_socket(a), sockio.raw_socket(b)
        ticks = 0

        async def other() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            await trio.lowlevel.checkpoint()
            before = ticks
            for _ in range(10 * sockio.YIELD_EVERY):  # every call succeeds at once
                await sockio.send_all(ra, b"x")
                assert await sockio.recv(rb, 16) == b"x"
            assert ticks - before >= 10  # the loop let the other task run
            nursery.cancel_scope.cancel()


async def test_a_cancelled_loop_that_never_blocks_is_stopped() -> None:
    a, b = trio.socket.socketpair()
    with a, b:
        ra, rb = sockio.raw_socket(a), sockio.raw_socket(b)
        calls = 0
        with trio.CancelScope() as scope:
            scope.cancel()
            for _ in range(10 * sockio.YIELD_EVERY):
                await sockio.send_all(ra, b"x")
                await sockio.recv(rb, 16)
                calls += 1
        assert scope.cancelled_caught
        assert calls < 2 * sockio.YIELD_EVERY
