"""Plugin loading: built-ins, entry points and drop-in files, through one path, never fatal.

:func:`get_plugin_manager` is called once at start (a reload does not reload plugins);
importing this module does nothing. The order is: the built-in modules of ``plugins/``, then
the entry points of group ``modeld`` (each load wrapped: a broken distribution is logged
with its name and skipped), then ``*.py`` files from the ``plugin_dirs`` in sorted order (a
file that fails to import is logged and skipped). Where each plugin came from is kept for
``modeld plugins``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy
import structlog

from ..config import model_label, provider_error
from ..core.settings import Config
from . import hookspecs
from .context import Probe

Log = Any

#: The built-in probe plugins, registered exactly like third-party ones.
BUILTIN_PLUGINS: tuple[str, ...] = ("plugins.openai", "plugins.ollama", "plugins.local_file")

#: The entry-point group third-party distributions declare their plugins in.
ENTRY_POINT_GROUP = "modeld"


class PluginError(Exception):
    """The set of plugins cannot be used as it is (two plugins claim one probe name, ...)."""


@dataclass(frozen=True, slots=True)
class PluginOrigin:
    """Where a plugin came from: ``source`` is "builtin", "entry point" or "file"."""

    name: str  # the short name shown to people
    source: str
    detail: str  # module name; "group:name = value (dist version)"; or the file path


@dataclass(frozen=True, slots=True)
class PluginFailure:
    """A plugin that could not be loaded, and why (shown by ``modeld plugins``)."""

    name: str
    source: str
    detail: str
    reason: str


class ModeldPluginManager(pluggy.PluginManager):
    """A pluggy manager that remembers each plugin's origin and the plugins that failed."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.origins: dict[str, PluginOrigin] = {}
        self.failures: list[PluginFailure] = []

    def origin(self, plugin: object) -> PluginOrigin:
        """Where ``plugin`` came from (registered by other means: source "registered")."""
        name = self.get_name(plugin) or repr(plugin)
        return self.origins.get(name) or PluginOrigin(name, "registered", name)


def get_plugin_manager(
    plugin_dirs: Sequence[str] = (),
    *,
    load_entry_points: bool = True,
    log: Log | None = None,
    builtins: Sequence[str] = BUILTIN_PLUGINS,
) -> ModeldPluginManager:
    """A plugin manager with the hook specs, the built-ins, entry points and drop-in files."""
    log = log if log is not None else structlog.get_logger("modeld.plugins")
    pm = ModeldPluginManager()
    pm.add_hookspecs(hookspecs)
    for module_name in builtins:
        short = module_name.rpartition(".")[2]
        origin = PluginOrigin(short, "builtin", module_name)
        _load(pm, f"builtin:{short}", origin, partial(importlib.import_module, module_name), log)
    if load_entry_points:
        for ep in _entry_points():
            dist = getattr(ep, "dist", None)
            dist_label = f" ({dist.name} {dist.version})" if dist is not None else ""
            origin = PluginOrigin(ep.name, "entry point", f"{ep.value}{dist_label}")
            _load(pm, f"entrypoint:{ep.name}", origin, ep.load, log)
    for path in _drop_in_files(plugin_dirs, log):
        origin = PluginOrigin(path.stem, "file", str(path))
        _load(pm, f"file:{path}", origin, partial(_import_file, path), log)
    return pm


def _entry_points() -> Iterable[importlib.metadata.EntryPoint]:
    """The entry points of group ``modeld`` from every installed distribution, by name."""
    return sorted(
        importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name
    )


def _drop_in_files(plugin_dirs: Sequence[str], log: Log) -> list[Path]:
    files: list[Path] = []
    for directory in plugin_dirs:
        root = Path(directory)
        if not root.is_dir():
            # a missing plugins.d is normal on a fresh host; say so once at debug level
            log.debug("plugin_dir_missing", path=str(root))
            continue
        files.extend(
            sorted(p for p in root.glob("*.py") if p.is_file() and not p.name.startswith("."))
        )
    return files


def _import_file(path: Path) -> ModuleType:
    """The module executed from a drop-in file, under a name unique to its path."""
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    module_name = f"modeld_plugin_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up here
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def _load(
    pm: ModeldPluginManager,
    name: str,
    origin: PluginOrigin,
    load: Callable[[], object],
    log: Log,
) -> None:
    """Import and register one plugin; a failure is logged and recorded, never raised."""

    def fail(reason: str) -> None:
        log.error(
            "plugin_load_failed",
            plugin=origin.name,
            source=origin.source,
            origin=origin.detail,
            error=reason,
        )
        pm.failures.append(PluginFailure(origin.name, origin.source, origin.detail, reason))

    try:
        plugin = load()
    except (Exception, SystemExit) as exc:
        fail(_describe_import_error(exc))
        return
    if pm.is_registered(plugin):
        fail(f"already registered as {pm.get_name(plugin)!r}")
        return
    try:
        pm.register(plugin, name=name)
    except (ValueError, pluggy.PluginValidationError) as exc:
        fail(str(exc))
        return
    unknown = [
        caller.name
        for caller in pm.get_hookcallers(plugin) or []
        if not caller.has_spec()
        and any(
            impl.plugin is plugin and not impl.optionalhook for impl in caller.get_hookimpls()
        )
    ]
    if unknown:
        pm.unregister(plugin)
        fail(f"unknown hook {', '.join(sorted(unknown))} (misspelt? hooks start with modeld_)")
        return
    pm.origins[name] = origin
    log.debug("plugin_loaded", plugin=origin.name, source=origin.source, origin=origin.detail)


def _describe_import_error(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError):
        where = f" (line {exc.lineno})" if exc.lineno else ""
        return f"SyntaxError: {exc.msg}{where}"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ----------------------------------------------------------------------------- probes


@dataclass(frozen=True, slots=True)
class RegisteredProbe:
    """One ``register(name, probe)`` call, and which plugin made it."""

    name: str
    probe: Probe
    plugin: str  # the manager's name for the plugin


def registered_probes(pm: pluggy.PluginManager, log: Log | None = None) -> list[RegisteredProbe]:
    """Every probe registration, in plugin registration order.

    A plugin whose ``modeld_register_probes`` raises or registers something that is not a
    probe is logged and contributes nothing; it does not stop the others.
    """
    log = log if log is not None else structlog.get_logger("modeld.plugins")
    found: list[RegisteredProbe] = []
    for impl in pm.hook.modeld_register_probes.get_hookimpls():
        plugin_name = pm.get_name(impl.plugin) or repr(impl.plugin)
        mine: list[RegisteredProbe] = []

        def register(
            name: str, probe: Any, _plugin: str = plugin_name, _mine: list[Any] = mine
        ) -> None:
            if not isinstance(name, str) or not name:
                raise PluginError(f"plugin {_plugin!r} registered a probe with name {name!r}")
            if not callable(getattr(probe, "probe", None)):
                raise PluginError(
                    f"plugin {_plugin!r} registered {type(probe).__name__} as probe {name!r}, "
                    "but it has no probe(spec, ctx) method"
                )
            _mine.append(RegisteredProbe(name, probe, _plugin))

        try:
            impl.function(**({"register": register} if "register" in impl.argnames else {}))
        except Exception as exc:
            log.error(
                "plugin_register_failed",
                plugin=plugin_name,
                error=f"{type(exc).__name__}: {exc}",
            )
            continue
        found.extend(mine)
    return found


def collect_probes(pm: pluggy.PluginManager, log: Log | None = None) -> dict[str, Probe]:
    """Probe name → probe from every plugin; raises PluginError when two claim one name."""
    probes: dict[str, Probe] = {}
    owners: dict[str, str] = {}
    for entry in registered_probes(pm, log):
        if entry.name in probes:
            raise PluginError(
                f'probe "{entry.name}" is registered by two plugins: '
                f"{_describe(pm, owners[entry.name])} and {_describe(pm, entry.plugin)}; "
                "remove or rename one of them"
            )
        probes[entry.name] = entry.probe
        owners[entry.name] = entry.plugin
    return probes


def _describe(pm: pluggy.PluginManager, plugin_name: str) -> str:
    if isinstance(pm, ModeldPluginManager) and plugin_name in pm.origins:
        origin = pm.origins[plugin_name]
        return f"{origin.name!r} ({origin.source} {origin.detail})"
    return repr(plugin_name)


# ----------------------------------------------------------------------------- observers


def notify_observers(pm: pluggy.PluginManager, hook_name: str, log: Log, **kwargs: Any) -> None:
    """Call every implementation of an observer hook, each isolated from the others.

    pluggy would stop at the first implementation that raises; here each one runs in turn
    (last registered first, as pluggy orders them) and a raising one is logged with its name.
    Wrappers are not observers and are not called.
    """
    caller = getattr(pm.hook, hook_name)
    for impl in reversed(caller.get_hookimpls()):
        if impl.hookwrapper or impl.wrapper:
            continue
        plugin_name = pm.get_name(impl.plugin) or repr(impl.plugin)
        try:
            impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
        except (Exception, SystemExit) as exc:  # sys.exit() in an observer is a plugin bug
            log.error(
                "observer_failed",
                hook=hook_name,
                plugin=plugin_name,
                error=f"{type(exc).__name__}: {exc}",
            )


# ----------------------------------------------------------------------------- report


def plugins_report(pm: pluggy.PluginManager) -> str:
    """A table of plugins: name, where it came from, and the probe names it registers."""
    by_plugin: dict[str, list[str]] = {}
    for entry in registered_probes(pm, structlog.get_logger("modeld.plugins")):
        by_plugin.setdefault(entry.plugin, []).append(entry.name)
    rows: list[tuple[str, str, str, str]] = []
    for plugin_name, plugin in pm.list_name_plugin():
        if isinstance(pm, ModeldPluginManager):
            origin = pm.origin(plugin)
        else:
            origin = PluginOrigin(plugin_name, "registered", plugin_name)
        probes = ", ".join(by_plugin.get(plugin_name, [])) or "-"
        rows.append((origin.name, origin.source, probes, origin.detail))
    failures = pm.failures if isinstance(pm, ModeldPluginManager) else []
    for failure in failures:
        rows.append((failure.name, f"{failure.source} (FAILED)", "-",
                     f"{failure.detail}: {failure.reason}"))
    header = ("PLUGIN", "SOURCE", "PROBES", "FROM")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    lines = [
        "  ".join(cell.ljust(widths[i]) if i < 3 else cell for i, cell in enumerate(row))
        for row in [header, *rows]
    ]
    if failures:
        lines.append("")
        lines.append(f"{len(failures)} plugin(s) failed to load and were skipped.")
    return "\n".join(line.rstrip() for line in lines) + "\n"


def unknown_providers(config: Config, known: Mapping[str, Any]) -> list[str]:
    """Errors for models whose provider no loaded plugin serves, naming the key path."""
    errors = (provider_error(model_label(i, spec.id), spec.provider, known)
              for i, spec in enumerate(config.models))
    return [f"{config.path}: {error}" for error in errors if error]
