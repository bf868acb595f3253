"""Finding, enabling and asking plugins (pluggy, entry-point group ``backchannel.plugins``)."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points

import pluggy

from . import hookspecs
from ._exceptions import ConfigError
from ._plugin_api import PluginInfo

ENTRY_POINT_GROUP = "backchannel.plugins"


@dataclass(frozen=True, slots=True)
class PluginSelection:
    """Which plugins to use: ``only`` (None = all found) minus ``disabled``."""

    only: tuple[str, ...] | None = None
    disabled: tuple[str, ...] = ()

    def merged(self, other: PluginSelection) -> PluginSelection:
        """Command-line choices (``other``) narrow the config file's."""
        only = other.only if other.only is not None else self.only
        return PluginSelection(only, tuple(dict.fromkeys(self.disabled + other.disabled)))


@dataclass(frozen=True, slots=True)
class LoadedPlugin:
    """A plugin as ``backchannel plugins`` shows it."""

    name: str
    distribution: str
    version: str
    enabled: bool
    info: PluginInfo | None


def installed_plugin_names() -> list[str]:
    """Names registered in the entry-point group, sorted."""
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def get_plugin_manager(
    selection: PluginSelection = PluginSelection(),
    *,
    extra_plugins: Mapping[str, object] | None = None,
    source: str = "command line",
) -> pluggy.PluginManager:
    """A plugin manager with the selected installed plugins (and ``extra_plugins``) loaded.

    Raises ConfigError naming any selected plugin that is not installed.
    """
    manager = pluggy.PluginManager("backchannel")
    manager.add_hookspecs(hookspecs)
    available = set(installed_plugin_names()) | set(extra_plugins or {})
    for key, names in (
        ("plugins.enable", selection.only or ()),
        ("plugins.disable", selection.disabled),
    ):
        for name in names:
            if name not in available:
                found = ", ".join(sorted(available)) or "none"
                raise ConfigError(
                    source, key, f"no plugin named {name!r} is installed (found: {found})"
                )
    for name in available:
        if name in selection.disabled or (
            selection.only is not None and name not in selection.only
        ):
            manager.set_blocked(name)
    manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for name, plugin in (extra_plugins or {}).items():
        if not manager.is_blocked(name):
            manager.register(plugin, name=name)
    return manager


def plugin_infos(manager: pluggy.PluginManager) -> dict[str, PluginInfo]:
    """Each enabled plugin's own description, keyed by its registered name."""
    infos: dict[str, PluginInfo] = {}
    for impl in manager.hook.backchannel_plugin_info.get_hookimpls():
        info = impl.function()
        if not isinstance(info, PluginInfo):
            raise TypeError(
                f"plugin {impl.plugin_name!r}: backchannel_plugin_info must return PluginInfo"
            )
        infos[impl.plugin_name] = info
    return infos


def describe_plugins(manager: pluggy.PluginManager) -> list[LoadedPlugin]:
    """All installed plugins, enabled or not, with distribution versions."""
    infos = plugin_infos(manager)
    rows: list[LoadedPlugin] = []
    seen: set[str] = set()
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if ep.name in seen:
            continue
        seen.add(ep.name)
        dist = ep.dist
        rows.append(
            LoadedPlugin(
                ep.name,
                dist.name if dist is not None else "?",
                dist.version if dist is not None else "?",
                not manager.is_blocked(ep.name),
                infos.get(ep.name),
            )
        )
    for name, info in infos.items():
        if name not in seen:
            rows.append(LoadedPlugin(name, "(registered in-process)", info.version, True, info))
    return rows


def plugin_table_names(tables: Iterable[str]) -> list[str]:
    """The ``[plugins.<name>]`` tables present (everything but the selection keys)."""
    return [name for name in tables if name not in ("enable", "disable")]


def collect_hook_results(
    manager: pluggy.PluginManager, hook_name: str, **kwargs: object
) -> list[tuple[str, list[object]]]:
    """Call ``hook_name`` on each plugin; return (plugin name, returned sequence) pairs.

    Raises TypeError naming the plugin when a hook is async or returns something other than
    a list or tuple: both would otherwise fail later with an unclear message.
    """
    results: list[tuple[str, list[object]]] = []
    for impl in getattr(manager.hook, hook_name).get_hookimpls():
        returned = impl.function(**kwargs)
        if inspect.isawaitable(returned):
            if inspect.iscoroutine(returned):
                returned.close()
            raise TypeError(
                f"plugin {impl.plugin_name!r}: {hook_name} is async; hooks must be plain functions "
                "returning objects whose async methods the core awaits"
            )
        if returned is None:
            continue
        if not isinstance(returned, list | tuple):
            raise TypeError(
                f"plugin {impl.plugin_name!r}: {hook_name} must return a list, "
                f"not {type(returned).__name__}"
            )
        results.append((impl.plugin_name, list(returned)))
    return results
