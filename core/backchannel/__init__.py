"""backchannel: a reverse-invoke proxy. An on-premise connector dials out to a cloud gateway;
cloud applications reach on-premise systems through the tunnel, subject to the connector's
access control.

The public API is what this module exports; everything in underscore modules may change.
"""

from ._audit import AuditLog as AuditLog
from ._authorization import authenticate_authorization as authenticate_authorization
from ._authorization import parse_authorization as parse_authorization
from ._backend_tls import BackendTls as BackendTls
from ._backend_tls import UserTlsContexts as UserTlsContexts
from ._backend_tls import read_backend_tls as read_backend_tls
from ._config import ConnectorConfig as ConnectorConfig
from ._config import GatewayConfig as GatewayConfig
from ._config import is_valid_location_id as is_valid_location_id
from ._configutil import HostPort as HostPort
from ._configutil import Secret as Secret
from ._configutil import TableReader as TableReader
from ._connection_limit import ConnectionLimit as ConnectionLimit
from ._connector import Connector as Connector
from ._connector import open_connector as open_connector
from ._dial import is_connection_refused as is_connection_refused
from ._exceptions import AuthenticationError as AuthenticationError
from ._exceptions import BackchannelError as BackchannelError
from ._exceptions import ConfigError as ConfigError
from ._exceptions import NotConnectedError as NotConnectedError
from ._exceptions import StreamError as StreamError
from ._exceptions import TunnelError as TunnelError
from ._gateway import Gateway as Gateway
from ._gateway import open_gateway as open_gateway
from ._identity import PropagatedUser as PropagatedUser
from ._pki import CertificateAuthority as CertificateAuthority
from ._pki import TlsMaterial as TlsMaterial
from ._pki import write_throwaway_tls_material as write_throwaway_tls_material
from ._plugin_api import AppIdentity as AppIdentity
from ._plugin_api import ConnectorContext as ConnectorContext
from ._plugin_api import ConnectorHandler as ConnectorHandler
from ._plugin_api import DemoContext as DemoContext
from ._plugin_api import DemoPart as DemoPart
from ._plugin_api import DemoStep as DemoStep
from ._plugin_api import FrontDoor as FrontDoor
from ._plugin_api import GatewayContext as GatewayContext
from ._plugin_api import GatewayServices as GatewayServices
from ._plugin_api import PluginInfo as PluginInfo
from ._plugin_api import Role as Role
from ._plugin_api import Session as Session
from ._plugin_api import SystemMapping as SystemMapping
from ._principal_errors import PrincipalError as PrincipalError
from ._principal_errors import PrincipalReason as PrincipalReason
from ._proto._errors import ResetCode as ResetCode
from ._serve import serve_connections as serve_connections
from ._sockio import close_forcefully as close_forcefully
from ._splice import splice_streams as splice_streams
from ._stream import TunnelStream as TunnelStream
from ._transport import verifying_client_context as verifying_client_context
from ._tunnel import TunnelSettings as TunnelSettings
from ._user_ca import UserCertificate as UserCertificate
from ._user_ca import UserCertificateAuthority as UserCertificateAuthority
from ._version import __version__ as __version__
from .hookspecs import hookimpl as hookimpl
