"""RFC plugin: a pyrfc-compatible client, a simulated ABAP system, and the connector's RFC handler.

For cloud applications, ``Connection`` is pyrfc's ``Connection``; with ``gateway``, ``app`` and
``app_secret`` (or ``app_token``) it reaches an ABAP system through a backchannel gateway by
its virtual ``ashost``/``sysnr`` (and ``location_id``) or a destination name (``dest``).
Without them it talks straight to a stub ABAP system (``backchannel-rfc-stub serve``).
"""

from ._connection import Connection as Connection
from ._demo_data import demo_system as demo_system
from ._descriptions import FunctionDescription as FunctionDescription
from ._descriptions import TypeDescription as TypeDescription
from ._errors import ABAPApplicationError as ABAPApplicationError
from ._errors import ABAPRuntimeError as ABAPRuntimeError
from ._errors import CommunicationError as CommunicationError
from ._errors import ExternalApplicationError as ExternalApplicationError
from ._errors import ExternalAuthorizationError as ExternalAuthorizationError
from ._errors import ExternalRuntimeError as ExternalRuntimeError
from ._errors import LogonError as LogonError
from ._errors import RFCError as RFCError
from ._errors import RFCLibError as RFCLibError
from ._errors import RfcRc as RfcRc
from ._errors import RFCTypeError as RFCTypeError
from ._stub_server import serve_stub as serve_stub
from ._system import AbapSystem as AbapSystem
from ._system import Session as Session
from ._system import User as User
