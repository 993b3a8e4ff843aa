"""Provider configuration: SDKs loaded on first use, keys, reprs, prices, limits, event loops."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import anyio
import pytest

import flowdsl as fd
import flowdsl.llm
from flowdsl.llm._prices import PriceTable

from _llm_server import LLMServer

KEY = "sk-config-SECRET-abcdef0123"


@pytest.fixture(scope="module")
def server() -> Iterator[LLMServer]:
    with LLMServer() as server:
        yield server


def test_importing_flowdsl_loads_no_sdk() -> None:
    code = (
        "import sys, flowdsl, flowdsl.llm, flowdsl.testing\n"
        "loaded = sorted(m for m in ('openai', 'anthropic', 'httpx2') if m in sys.modules)\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == ""


@pytest.mark.parametrize(("name", "module"), [("OpenAI", "openai"), ("Anthropic", "anthropic")])
def test_a_missing_sdk_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, name: str, module: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # what `import` sees when it is absent
    with pytest.raises(fd.ConfigError) as info:
        getattr(fd.llm, name)(api_key=KEY)
    assert str(info.value) == (
        f"fd.llm.{name} needs the {module!r} package, which is not installed. "
        f"Install it with `pip install 'flowdsl[{module}]'`"
    )


@pytest.mark.parametrize(("name", "env"), [("OpenAI", "OPENAI"), ("Anthropic", "ANTHROPIC")])
def test_a_missing_key_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, name: str, env: str
) -> None:
    monkeypatch.delenv(f"{env}_API_KEY", raising=False)
    with pytest.raises(fd.ConfigError, match=rf"^no {name} API key. Set {env}_API_KEY"):
        getattr(fd.llm, name)()


def test_a_compatible_server_needs_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    llm = fd.llm.OpenAI(base_url="http://127.0.0.1:11434/v1", model="llama3")
    assert repr(llm) == "<flowdsl.llm.OpenAI model='llama3' base_url='http://127.0.0.1:11434/v1'>"


def test_keys_come_from_the_environment_and_stay_out_of_reprs(
    monkeypatch: pytest.MonkeyPatch, server: LLMServer
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    providers = [
        fd.llm.OpenAI(base_url=server.openai_url, model="m"),
        fd.llm.Anthropic(base_url=server.anthropic_url, model="m"),
    ]

    async def main() -> None:
        for llm in providers:
            async with llm:
                await fd.llm.chat("hi", llm=llm)

    server.reset()
    anyio.run(main)
    sent = [
        r.headers.get("authorization", "") + r.headers.get("x-api-key", "") for r in server.requests
    ]
    assert all(KEY in s for s in sent)
    for llm in providers:
        assert KEY not in repr(llm)


def test_one_provider_serves_several_event_loops(server: LLMServer) -> None:
    # Each event loop gets its own SDK client; a provider made once works in all of them.
    llm = fd.llm.OpenAI(api_key=KEY, base_url=server.openai_url, model="m", max_concurrency=1)

    async def main(text: str) -> str:
        async with llm:
            return (await fd.llm.chat(text, llm=llm)).text

    assert anyio.run(main, "first", backend="asyncio") == "echo: first"
    assert anyio.run(main, "second", backend="trio") == "echo: second"
    assert anyio.run(main, "third", backend="asyncio") == "echo: third"


def test_prices_match_by_prefix_and_can_be_overridden() -> None:
    table = PriceTable({"gpt-4o-mini": (1.0, 2.0), "mine": fd.llm.Price(0.5, 0.5)})
    assert table.lookup("gpt-4o-mini-2024-07-18") == fd.llm.Price(1.0, 2.0)
    assert table.lookup("gpt-4o-2024-08-06") == fd.llm.DEFAULT_PRICES["gpt-4o"]
    assert table.lookup("claude-3-5-haiku-latest") == fd.llm.DEFAULT_PRICES["claude-3-5-haiku"]
    assert table.lookup("mine") == fd.llm.Price(0.5, 0.5)
    assert table.lookup("unknown-model") is None
    assert fd.llm.Price(3.0, 15.0).cost(fd.llm.Usage(1_000_000, 100_000)) == pytest.approx(4.5)


def test_a_bad_price_says_how_to_write_one() -> None:
    with pytest.raises(fd.ConfigError, match=r"^the price of 'm' must be a Price or an"):
        PriceTable({"m": "cheap"})


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"max_concurrency": 0}, r"^max_concurrency must be at least 1, not 0"),
        ({"tokens_per_minute": 0}, r"^tokens_per_minute must be at least 1, not 0"),
        ({"max_retries": -1}, r"^max_retries must be 0 or more, not -1"),
    ],
)
def test_bad_limits_are_config_errors(option: dict[str, int], message: str) -> None:
    with pytest.raises(fd.ConfigError, match=message):
        fd.llm.OpenAI(api_key=KEY, **option)  # type: ignore[arg-type]


def test_a_call_without_any_model_says_where_to_name_one(server: LLMServer) -> None:
    llm = fd.llm.OpenAI(api_key=KEY, base_url=server.openai_url)

    async def main() -> None:
        async with llm:
            await fd.llm.chat("x", llm=llm)

    with pytest.raises(fd.ConfigError, match=r"^no model named for this OpenAI call"):
        anyio.run(main)


def test_public_names_match_all() -> None:
    public = {n for n in vars(flowdsl.llm) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(flowdsl.llm, n)).__name__ == "module"}
    assert public - modules - {"annotations"} == set(flowdsl.llm.__all__)
    assert flowdsl.llm.LLMError.__module__ == "flowdsl.llm"
    assert issubclass(flowdsl.llm.LLMError, fd.FlowError)
    assert issubclass(flowdsl.llm.StructuredOutputError, ValueError)
