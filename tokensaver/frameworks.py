"""``wrap()`` for framework objects that hold an anthropic client: LangChain's ``ChatAnthropic``.

``wrap(ChatAnthropic(...))`` returns a copy of the model whose two SDK clients (LangChain keeps a
sync one in ``_client`` and an async one in ``_async_client``, both private) are wrapped, sharing one
pipeline and run: ``invoke``, ``stream``, ``ainvoke``, ``astream`` and tool loops all go through
tokensaver. The caller's model is left as it was.

Other frameworks need no adapter (see the README's "Use with ..." sections): pydantic-ai takes an
anthropic client (``AnthropicProvider(anthropic_client=wrap(AsyncAnthropic()))``); LiteLLM and the
Claude Agent SDK (which runs the Claude Code CLI) reach the API over HTTP and go through
``tokensaver proxy`` / ``tokensaver run``.

Unsafe: the LangChain names used are private; if a release renames them, :func:`wrap_framework`
raises a ``TypeError`` saying so instead of returning a model that bypasses tokensaver.
"""

from __future__ import annotations

from typing import Any

LANGCHAIN_CLIENTS = ("_client", "_async_client")
NOT_A_CLIENT = (
    "tokensaver.wrap() expects an anthropic client (anthropic.Anthropic, AsyncAnthropic, or their "
    "Bedrock / Vertex variants) or a LangChain ChatAnthropic, got {name}. "
    "pydantic-ai: AnthropicProvider(anthropic_client=tokensaver.wrap(anthropic.AsyncAnthropic())); "
    "LiteLLM, the Claude Agent SDK and other tools that call the API over HTTP: run them through "
    "`tokensaver run -- CMD` or point their Anthropic base URL at `tokensaver proxy` "
    '(README: "Use with ...").'
)


def is_langchain_chat_anthropic(obj: Any) -> bool:
    """Whether ``obj`` is a LangChain ``ChatAnthropic`` (or a subclass), without importing LangChain."""
    return any(
        cls.__name__ == "ChatAnthropic" and cls.__module__.startswith("langchain_anthropic")
        for cls in type(obj).__mro__
    )


def wrap_framework(obj: Any, config: Any = None, **kwargs: Any) -> Any:
    """``wrap()`` for a non-SDK object: a wrapped copy of a LangChain ``ChatAnthropic``, else a ``TypeError``.

    :param kwargs: ``wrap()``'s keyword arguments (``run``, ``plugin_manager``, ``pipeline``, ``clock``).
    """
    if not is_langchain_chat_anthropic(obj):
        raise TypeError(NOT_A_CLIENT.format(name=type(obj).__name__))
    from .middleware import wrap
    from .pipeline import Pipeline

    pipeline = kwargs.pop("pipeline", None)
    if pipeline is None:
        pipeline = Pipeline(
            config,
            plugin_manager=kwargs.pop("plugin_manager", None),
            run=kwargs.pop("run", None),
            clock=kwargs.pop("clock", None),
        )
    model = obj.model_copy()
    for name in LANGCHAIN_CLIENTS:
        try:
            client = getattr(model, name)  # a cached_property: built on the copy if the caller never used it
        except AttributeError as exc:
            raise TypeError(
                f"this langchain-anthropic ChatAnthropic has no {name}: tokensaver.wrap() cannot reach its "
                "anthropic client; use `tokensaver run -- python your_app.py` (the proxy) instead"
            ) from exc
        # cached_property values live in the instance __dict__; pydantic's __setattr__ refuses private names
        model.__dict__[name] = wrap(client, pipeline=pipeline)
    model.__dict__["tokensaver"] = pipeline
    return model
