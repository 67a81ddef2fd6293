"""One module per client API herd coalesces, each behind proxy.apis.base.Api.

APIS: the coalesced APIs proxy.app serves, each on its own POST route.
"""

from proxy.apis.chat import CHAT
from proxy.apis.completions import COMPLETIONS
from proxy.apis.messages import MESSAGES
from proxy.apis.responses import RESPONSES

APIS = (CHAT, RESPONSES, COMPLETIONS, MESSAGES)
