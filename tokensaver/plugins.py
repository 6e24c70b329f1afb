"""The plugin manager: discovery through the ``tokensaver`` entry-point group, one manager per wrap().

Built-in plugins are registered by our own ``[project.entry-points.tokensaver]`` exactly like a
third-party distribution's; this module imports none of them. The entry-point name is the name used
in config. Two distributions claiming the same name: the first wins and a warning names both.
"""

from __future__ import annotations

import contextvars
import difflib
import importlib.metadata
import logging
import queue
import threading
import time
import warnings
from typing import Any

import pluggy

from . import hookspecs
from .errors import ConfigError, TransformError, UnknownPluginError
from .settings import Schema, reference, schema_of

log = logging.getLogger("tokensaver.plugins")

GROUP = "tokensaver"


class PluginManager(pluggy.PluginManager):
    """pluggy's manager, plus where each plugin came from (for errors that name its entry point)."""

    def __init__(self) -> None:
        super().__init__(GROUP)
        self.origins: dict[str, str] = {}  # name -> "entry point x = mod (dist 1.0)" / "given in code"


def get_plugin_manager(
    extra: dict[str, object] | None = None, *, load_entrypoints: bool = True
) -> PluginManager:
    """A fresh plugin manager with every installed plugin (and ``extra`` name -> plugin) registered.

    A plugin that fails to import, or that pluggy rejects (an argument its hook does not have, a
    wrapper that is not a generator), is kept as a stand-in: it breaks ``wrap()`` only when enabled
    (see :func:`check_enabled`), never the other plugins.
    """
    pm = PluginManager()
    pm.add_hookspecs(hookspecs)
    if load_entrypoints:
        _load_entrypoints(pm)
    for name, plugin in (extra or {}).items():
        if pm.has_plugin(name):
            pm.unregister(name=name)
        _register(pm, plugin, name, "given in code")
    return pm


def _load_entrypoints(pm: PluginManager) -> None:
    seen: dict[str, str] = {}
    for ep in sorted(importlib.metadata.entry_points(group=GROUP), key=lambda e: e.name):
        dist = getattr(ep.dist, "name", "?")
        if ep.name in seen:
            warnings.warn(
                f"tokensaver plugin name {ep.name!r} is registered by both {seen[ep.name]} and {dist}; "
                f"using the one from {seen[ep.name]}",
                stacklevel=3,
            )
            continue
        seen[ep.name] = dist
        version = getattr(ep.dist, "version", "")
        origin = f"entry point {ep.name} = {ep.value} from {dist}{f' {version}' if version else ''}"
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin must not break the others: it is reported by name
            log.warning("tokensaver plugin %r (%s) failed to load: %s", ep.name, ep.value, exc)
            pm.register(
                _BrokenPlugin(ep.name, f"failed to import: {type(exc).__name__}: {exc}"), name=ep.name
            )
            pm.origins[ep.name] = origin
            continue
        if pm.is_registered(plugin):  # same module under two names
            continue
        _register(pm, plugin, ep.name, origin)


def _register(pm: PluginManager, plugin: object, name: str, origin: str) -> None:
    pm.origins[name] = origin
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:  # pluggy validates before it changes any state
        why = " ".join(str(exc).split("\n")[1:]) or str(exc)
        pm.register(_BrokenPlugin(name, f"rejected by pluggy: {why}", plugin), name=name)


class _BrokenPlugin:
    """Stands in for a plugin that could not be registered; enabling it raises a ConfigError naming it."""

    def __init__(self, name: str, error: str, plugin: object = None) -> None:
        self.name = name
        self.error = error
        self.plugin = plugin  # the object pluggy rejected, if it imported


def installed(pm: pluggy.PluginManager) -> list[str]:
    """Names of the registered plugins (broken ones included)."""
    return sorted(name for name, _ in pm.list_name_plugin())


def origin(pm: pluggy.PluginManager, name: str) -> str:
    """Where plugin ``name`` came from: its entry point (``name = module from dist``), or "given in code"."""
    return str(getattr(pm, "origins", {}).get(name, "given in code"))


def check_enabled(pm: pluggy.PluginManager, names: list[str], source: str) -> None:
    """Raise a ConfigError for an enabled plugin that is not installed or that the core cannot call.

    From pluggy's own data (the hook callers of each enabled plugin and their implementations): a
    plugin that failed to import or that pluggy rejected, an implementation of a hook that has no
    spec (a misspelled name, what ``PluginManager.check_pending`` reports), and a ``wrapper=True`` /
    ``hookwrapper=True`` implementation (each plugin is a stage of its own, timed and bounded, so
    there is nothing for a wrapper to wrap). Disabled plugins are not checked.
    """
    known = installed(pm)
    for name in names:
        plugin = pm.get_plugin(name)
        if plugin is None:
            raise UnknownPluginError(
                f"unknown plugin {name!r}; installed plugins: {', '.join(known) or '(none)'}",
                key="plugins",
                source=source,
            )
        why = problem(pm, plugin)
        if why:
            raise ConfigError(f"plugin {name!r} ({origin(pm, name)}) {why}", key="plugins", source=source)


def problem(pm: pluggy.PluginManager, plugin: object) -> str | None:
    """Why the core cannot call ``plugin`` (see :func:`check_enabled`), or None."""
    if isinstance(plugin, _BrokenPlugin):
        return plugin.error
    specs = sorted(n for n, c in vars(pm.hook).items() if not n.startswith("_") and c.has_spec())
    for caller in pm.get_hookcallers(plugin) or []:
        for impl in caller.get_hookimpls():
            if impl.plugin is not plugin:
                continue
            if not caller.has_spec() and not impl.optionalhook:
                near = difflib.get_close_matches(caller.name, specs, n=1)
                hint = f"did you mean {near[0]!r}? " if near else ""
                return f"implements {caller.name!r}, which is not a tokensaver hook ({hint}hooks: {', '.join(specs)})"
            if impl.wrapper or impl.hookwrapper:
                kind = "wrapper=True" if impl.wrapper else "hookwrapper=True"
                return (
                    f"implements {caller.name} as a wrapper ({kind}), which tokensaver does not support: "
                    "each plugin's hook is called on its own, timed and bounded; implement it plainly"
                )
    return None


def impl_for(pm: pluggy.PluginManager, hook: str, plugin_name: str) -> Any | None:
    """The HookImpl of one plugin for one hook, or None when the plugin does not implement it."""
    plugin = pm.get_plugin(plugin_name)
    if plugin is None:
        return None
    for impl in getattr(pm.hook, hook).get_hookimpls():
        if impl.plugin is plugin:
            return impl
    return None


def reads_only(pm: pluggy.PluginManager, plugin_name: str) -> bool:
    """The plugin declares ``tokensaver_read_only = True``: it never edits a body or block it is given,
    nor one it returned, so its hooks get the call's own blocks, not copies (nor the check that its
    copies are intact). Built-ins declare it (their property tests check it); a plugin that does not
    gets its own copies, checked after each hook."""
    return getattr(pm.get_plugin(plugin_name), "tokensaver_read_only", False) is True


def call_one(impl: Any, **kwargs: Any) -> Any:
    """Call a single hook implementation with the arguments it declares."""
    if impl.wrapper or impl.hookwrapper:  # rejected in wrap(); this guards a pipeline built otherwise
        raise ConfigError(f"plugin {impl.plugin_name!r}: wrapper implementations are not supported")
    return impl.function(
        *[kwargs[a] for a in impl.argnames], **{k: kwargs[k] for k in impl.kwargnames if k in kwargs}
    )


class PluginFault(Exception):
    """A plugin hook call that was discarded: ``kind`` is "timeout", "saturated", "raised",
    "mutated_input" or "invalid_output: <rule>"."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


MAX_STUCK = 4  # per plugin: calls still running past their bound before the plugin is skipped
IDLE_SECONDS = 30.0  # an idle worker thread exits after this long


class _Job:
    __slots__ = ("plugin", "fn", "kwargs", "context", "done", "finished", "abandoned", "result", "error")

    def __init__(self, plugin: str, fn: Any, kwargs: dict[str, Any]) -> None:
        self.plugin, self.fn, self.kwargs = plugin, fn, kwargs
        self.context = contextvars.copy_context()  # the hook sees the caller's context, as if inline
        self.done = threading.Event()
        self.finished = self.abandoned = False
        self.result: Any = None
        self.error: BaseException | None = None


class _Worker:
    def __init__(self, runner: HookRunner) -> None:
        self.runner = runner
        self.jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self.usable = True
        threading.Thread(target=self._loop, name="tokensaver-plugin-worker", daemon=True).start()

    def _loop(self) -> None:
        runner = self.runner
        while True:
            try:
                job = self.jobs.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with runner.lock:
                    if self.jobs.empty():
                        self.usable = False
                        return
                continue
            try:
                job.result = job.context.run(job.fn, **job.kwargs)
            except BaseException as exc:  # handed to the caller, raised there as if called inline
                job.error = exc
            with runner.lock:
                job.finished = True
                if job.abandoned:
                    runner.stuck[job.plugin] -= 1
            job.done.set()
            if job.abandoned:
                return  # its caller has a new worker; this one was left to finish alone


class HookRunner:
    """Runs plugin hook calls in worker threads and waits a bounded time for each.

    Each calling thread has its own worker (a plugin sees one thread per caller, as when it ran
    inline). A call past its bound is abandoned: the caller gets :class:`PluginFault` ("timeout")
    and a new worker; the late thread finishes alone and nothing it returns is used (stages work on
    private copies, so it cannot edit what was sent). A plugin with ``MAX_STUCK`` abandoned calls
    still running is skipped ("saturated") until one returns, so hung threads stay bounded and
    never hold a thread another call needs.
    """

    def __init__(self, max_stuck: int = MAX_STUCK) -> None:
        self.lock = threading.Lock()
        self.stuck: dict[str, int] = {}
        self.max_stuck = max_stuck
        self._local = threading.local()

    def call(self, plugin: str, timeout: float, fn: Any, **kwargs: Any) -> Any:
        """``fn(**kwargs)`` in this thread's worker, within ``timeout`` seconds; raises what it raises."""
        with self.lock:
            if self.stuck.get(plugin, 0) >= self.max_stuck:
                raise PluginFault(
                    "saturated", f"{self.stuck[plugin]} earlier calls are still running past their timeout"
                )
            worker = getattr(self._local, "worker", None)
            if worker is None or not worker.usable:
                worker = self._local.worker = _Worker(self)
            job = _Job(plugin, fn, kwargs)
            worker.jobs.put(job)  # under the lock: an idle worker cannot exit with a job queued
        deadline = time.monotonic() + timeout
        while not job.done.wait(max(0.0, deadline - time.monotonic())):
            # a hook in a bounded wait of the core's (ctx.call_model, ctx.waiting) is not hung
            waiting = getattr(kwargs.get("ctx"), "wait_deadline", None)
            if isinstance(waiting, float) and waiting > time.monotonic():
                deadline = waiting
                continue
            with self.lock:
                if not job.finished:
                    job.abandoned = True
                    worker.usable = False
                    self._local.worker = None
                    self.stuck[plugin] = self.stuck.get(plugin, 0) + 1
                    raise PluginFault("timeout", f"no answer within {timeout:g} s")
        if job.error is not None:
            raise job.error
        return job.result


_RUNNER = HookRunner()


def hook_runner() -> HookRunner:
    """The process-wide runner: the cap on a plugin's hung threads holds across pipelines."""
    return _RUNNER


def ordered(pm: pluggy.PluginManager, hook: str, names: list[str]) -> list[tuple[str, Any]]:
    """``(name, impl)`` for the enabled plugins implementing ``hook``: config order, then tryfirst/trylast."""
    found = [(n, impl_for(pm, hook, n)) for n in names]
    present = [(n, i) for n, i in found if i is not None]
    rank = {id(i): (0 if i.tryfirst else 2 if i.trylast else 1) for _, i in present}
    return sorted(present, key=lambda p: rank[id(p[1])])  # sorted() is stable: config order kept


def configure(pm: pluggy.PluginManager, name: str, settings: dict[str, Any], source: str) -> dict[str, Any]:
    """One plugin's settings: checked against its declared :class:`~tokensaver.settings.Schema`
    (defaults filled in), then through its ``tokensaver_configure``; returns them normalized."""
    schema = schema_of(pm.get_plugin(name))
    if schema is not None:
        settings = schema.validate(settings, source, name=name)
    impl = impl_for(pm, "tokensaver_configure", name)
    if impl is None:
        return dict(settings)
    try:
        result = call_one(impl, settings=dict(settings), source=source)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"plugin {name!r} rejected its settings: {exc}", key=name, source=source) from exc
    return dict(settings) if result is None else dict(result)


def report_sections(
    pm: pluggy.PluginManager, plugin_names: list[str], records: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Each named plugin's report section (errors become a section saying so, never an exception).

    Only the named plugin's own implementation is called, with its name: a section hook need not
    check which plugin it is asked about.
    """
    sections: list[dict[str, Any]] = []
    for name in plugin_names:
        impl = impl_for(pm, "tokensaver_report_section", name)
        if impl is None:
            continue
        try:
            section = call_one(impl, plugin=name, calls=records)
        except Exception as exc:
            section = {
                "title": name,
                "summary": f"report section failed: {type(exc).__name__}: {exc}",
                "rows": [],
            }
        if section:
            sections.append({"plugin": name, "rows": [], "summary": "", **section})
    return sections


def strict_error(name: str, hook: str, exc: BaseException) -> TransformError:
    """The error strict mode raises for a failing plugin."""
    return TransformError(name, hook, exc)


# -- declared settings (`tokensaver plugins`, the README reference) ---------------------------


def schemas(pm: pluggy.PluginManager, *, builtin_only: bool = False) -> dict[str, Schema]:
    """Installed plugin name -> its declared settings (``builtin_only``: the plugins shipped here)."""
    out: dict[str, Schema] = {}
    for name in installed(pm):
        plugin = pm.get_plugin(name)
        if builtin_only and not getattr(plugin, "__name__", "").startswith("tokensaver_plugins."):
            continue
        schema = schema_of(plugin)
        if schema is not None:
            out[name] = schema
    return out


def settings_reference(pm: pluggy.PluginManager, *, builtin_only: bool = False) -> str:
    """The Markdown settings reference of the installed plugins, one table per plugin."""
    return reference(schemas(pm, builtin_only=builtin_only))
