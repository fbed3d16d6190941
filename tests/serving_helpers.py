"""What the serving tests share: two tiny random-weight tiers over real checkpoints and a length router.

The tiers share one tokenizer; a third checkpoint (`foreign`) has another.
The router's only weight is on the prompt length, so the expected tier of
every prompt is known: more than LENGTH_SPLIT tokens goes to the large tier.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from moe.difficulty import DEFERRAL_FEATURES, DeferralRule, HiddenFeatures
from serving.testing import length_router as serving_length_router
from serving.testing import make_tier

SERVE_CONFIG = Path(__file__).resolve().parents[1] / "infra" / "serve_config.yaml"
SERVE_CONFIG_PATHS = ("small", "large", "routing.router")  # the args a user edits to point at their files

SHORT = "the router sends"
LONG = " ".join(["the expert router sends each token to two of eight experts"] * 4)
LENGTH_SPLIT = 12  # prompts with more tokens than this go to the large tier


def length_router(path: Path) -> Path:
    """`serving.testing.length_router` at LENGTH_SPLIT, as a probe and with a token-level deferral rule.

    The small tier's last-layer state at the prompt's last token adds a little
    to the score (too little to change a decision, enough to show in
    `difficulty`), so the served scores prove the hidden states reach the
    ingress. Its deferral rule scores the small answer by its length; its table
    escalates every answer at fraction 1 and none at 0.
    """
    deferral = DeferralRule(mean=[0.0] * len(DEFERRAL_FEATURES), std=[1.0] * len(DEFERRAL_FEATURES),
                            weights=[0.0] * (len(DEFERRAL_FEATURES) - 1) + [0.5], bias=-1.0, threshold=0.5,
                            fraction_thresholds=[[0.0, 1.0], [1.0, 0.0]])
    return serving_length_router(path, LENGTH_SPLIT, hidden=HiddenFeatures(layers=(1,), pooling=("last",),
                                                                           hidden_size=16), deferral=deferral)


def make_tiers(root: Path) -> dict[str, Path]:
    """`small`, `large` (one tokenizer), `foreign` (another tokenizer) and `router` under root."""
    from data_pipeline.tokenize import train_tokenizer

    texts = [LONG, SHORT, "a mixture of experts model routes tokens", "grouped matrix multiply of the experts"] * 20
    tokenizer = train_tokenizer(texts, vocab_size=300, eos_token="<|endoftext|>")
    tokenizer_json = tokenizer.to_str()
    small = make_tier(root / "small", tokenizer_json, hidden=16, seed=1)
    large = make_tier(root / "large", tokenizer_json, hidden=32, seed=2)
    other = train_tokenizer(texts[:3], vocab_size=280, eos_token="<|endoftext|>")
    foreign = make_tier(root / "foreign", other.to_str(), hidden=16, seed=3)
    return {"small": small, "large": large, "foreign": foreign, "router": length_router(root / "router.json"),
            "root": root}


def serve_config_app(tiers: dict[str, Path]) -> dict:
    """The application of infra/serve_config.yaml, its paths replaced by the tiny tiers and router."""
    (app,) = yaml.safe_load(SERVE_CONFIG.read_text())["applications"]
    assert set(SERVE_CONFIG_PATHS) <= app["args"].keys(), app["args"]
    app["args"].update({"small": str(tiers["small"]), "large": str(tiers["large"]),
                        "routing.router": str(tiers["router"])})
    return app


class TcpForwarder:
    """A TCP forwarder on its own port in a background thread: the address an external tier is given.

    `stop()` closes its port and resets every open connection, as the endpoint's
    machine going away looks to a client (connections refused and reset);
    `start()` brings it back on the same port.
    """

    def __init__(self, target_port: int) -> None:
        import asyncio
        import socket
        import threading

        self.target_port = target_port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = None
        self.writers: set = set()

    def _call(self, coroutine):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=10)

    async def _pipe(self, reader, writer) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, client_reader, client_writer) -> None:
        import asyncio

        try:
            target_reader, target_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.close()
            return
        self.writers |= {client_writer, target_writer}
        await asyncio.gather(self._pipe(client_reader, target_writer), self._pipe(target_reader, client_writer))
        self.writers -= {client_writer, target_writer}

    async def _start(self) -> None:
        import asyncio

        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def _stop(self) -> None:
        self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()  # a reset, not a clean close: the machine is gone
        self.writers.clear()
        await self.server.wait_closed()

    def start(self) -> "TcpForwarder":
        self._call(self._start())
        return self

    def stop(self) -> None:
        self._call(self._stop())

    def close(self) -> None:
        if self.server is not None and self.server.is_serving():
            self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
