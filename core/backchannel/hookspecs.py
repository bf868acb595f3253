"""The hooks a backchannel plugin implements (pluggy project name ``backchannel``).

A plugin is a module or object registered under the entry-point group ``backchannel.plugins``;
the entry-point name is the plugin name, the stream protocol it serves, and its config table
``[plugins.<name>]``. Hooks are synchronous: they return objects whose async methods the core
awaits in its own nurseries.
"""

from __future__ import annotations

from collections.abc import Sequence

import pluggy

from ._plugin_api import (
    ConnectorContext,
    ConnectorHandler,
    DemoPart,
    FrontDoor,
    GatewayContext,
    PluginInfo,
)

hookspec = pluggy.HookspecMarker("backchannel")
hookimpl = pluggy.HookimplMarker("backchannel")


@hookspec
def backchannel_plugin_info() -> PluginInfo:  # type: ignore[empty-body]
    """Describe the plugin: name, version, roles and mapping protocols. Required.

    Not firstresult: every plugin answers for itself, and the core files each answer under the
    name the plugin is registered with (its entry-point name). Only plugins that answer get a
    ``[plugins.<name>]`` table reader.
    """


@hookspec
def backchannel_connector_handlers(context: ConnectorContext) -> Sequence[ConnectorHandler]:  # type: ignore[empty-body]
    """Connector side: return handlers for the stream protocols this plugin serves.

    Read your ``[plugins.<name>]`` table with ``context.config_for(name)`` and raise
    :class:`backchannel.ConfigError` for bad values: this runs before anything listens.
    Not firstresult: the results of all enabled plugins are collected.
    """


@hookspec
def backchannel_gateway_front_doors(context: GatewayContext) -> Sequence[FrontDoor]:  # type: ignore[empty-body]
    """Gateway side: return the front doors (listeners) configured for this plugin.

    Same configuration rules as ``backchannel_connector_handlers``. Not firstresult: the
    results of all enabled plugins are collected.
    """


@hookspec
def backchannel_demo_parts() -> Sequence[DemoPart]:  # type: ignore[empty-body]
    """Optional: this plugin's part of ``backchannel demo`` (backends, config, self-checks).

    Not firstresult: the parts of all installed plugins are collected.
    """
