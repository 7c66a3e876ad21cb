"""python-dbusmock template: polkitd as the stock "polkitd" template, plus what the stock one
cannot do: answer "not authorized, but a challenge would do" (is_challenge), and record the
flags of each CheckAuthorization, so that a test sees whether the daemon passed on the
caller's ALLOW_INTERACTIVE_AUTHORIZATION.

    python3 -m dbusmock --system --template tests/dbus/polkitd_challenge.py

Extra mock methods (org.freedesktop.DBus.Mock): SetChallenge(as actions): these actions,
unless allowed, are answered (false, true); GetChecks() -> a(su): (action, flags) of every
CheckAuthorization so far; ClearChecks().
"""

import dbus
from dbusmock import MOCK_IFACE
# Everything of the stock template (bus name, object, mock controls) ...
from dbusmock.templates.polkitd import *  # noqa: F401,F403
from dbusmock.templates.polkitd import MAIN_IFACE
from dbusmock.templates.polkitd import load as _stock_load


def load(mock, parameters):
    _stock_load(mock, parameters)
    mock.challenge = []
    mock.checks = []


# ... with CheckAuthorization replaced.
@dbus.service.method(MAIN_IFACE, in_signature='(sa{sv})sa{ss}us', out_signature='(bba{ss})',
                     async_callbacks=('ok_cb', '_err_cb'))
def CheckAuthorization(self, _subject, action_id, _details, flags, _cancellation_id, ok_cb, _err_cb):
    self.checks.append((str(action_id), int(flags)))
    allowed = action_id in self.allowed or self.allow_unknown
    challenge = not allowed and action_id in self.challenge
    ret = (allowed, challenge, dbus.Dictionary({}, signature='ss'))
    if self.simulate_hang or action_id in self.hanging_actions:
        self.hanging_calls.append((ok_cb, ret))
    else:
        ok_cb(ret)


@dbus.service.method(MOCK_IFACE, in_signature='as', out_signature='')
def SetChallenge(self, actions):
    self.challenge = [str(a) for a in actions]


@dbus.service.method(MOCK_IFACE, in_signature='', out_signature='a(su)')
def GetChecks(self):
    return dbus.Array(self.checks, signature='(su)')


@dbus.service.method(MOCK_IFACE, in_signature='', out_signature='')
def ClearChecks(self):
    self.checks = []
