#!/usr/bin/python3
"""Safety suite: a seeded randomized soak. Two simulated pens, many sessions, random Simulator
faults, owners that vanish, stops, pauses, reloads that forbid the running depth, unplugs,
cartridges tried again, and the daemon SIGKILLed or SIGTERMed and restarted on the same state
directory. After EVERY step:

  - every session id Start ever returned (this epoch) is in GetHistory; an entry without a
    reason is a session running on a pen right now; every other entry has an end and a reason
    from the contract, the one SessionEnded announced, and daemon-restart for a session the
    daemon was killed under;
  - no cartridge id appears in two sessions (single_use: true), and a cartridge that ran is
    refused with CartridgeSpent whenever the soak tries it again;
  - the audit chain verifies (nd_ledger_audit_verify through tests/safety/ledger-verify).

Environment: NEEDLED_SOAK_SEED (default: random, printed), NEEDLED_SOAK_STEPS (default 3000;
600 under ASan, 60 under valgrind), NEEDLED_SOAK_EPOCH (steps per state directory, default 500:
bounds the history and trail each check reads; `needlectl audit verify` checks each epoch's
ledger at its end). A failure prints the seed, the step and the steps before it."""

import collections
import os
import random
import signal
import subprocess

import dbus
from gi.repository import GLib

from needledtest import (ERR, SafetyTestCase, build_path, limits_text, main, profile_yaml, pump,
                         sanitized, unwrap, valgrind, wait_until)

REASONS = {'completed', 'stopped', 'client-vanished', 'client-heartbeat-lost', 'device-lost',
           'limits-changed', 'daemon-restart'}
FAULT_CODES = {'over-temperature', 'motor-stall', 'over-current', 'depth-deviation', 'heartbeat-lost',
               'low-battery', 'telemetry-corrupt', 'cartridge-expired', 'cartridge-removed',
               'session-duration', 'stop-failed'}
# Simulator faults, weighted toward the ones that trip at once (over-temperature takes ~1.5 s
# to heat up, unresponsive the 500 ms heartbeat timeout).
FAULTS = ['over-current'] * 4 + ['depth-deviation'] * 4 + ['corrupt-telemetry'] * 3 + \
         ['motor-stall'] * 3 + ['low-battery'] * 3 + ['unresponsive'] + ['over-temperature']
# Limits A allow the 1.2 mm depth the soak sometimes runs; B forbid it (a reload to B stops it).
# stall_time_ms 150: an injected stall trips quickly, while the motor's spin-up (about 100 ms to
# 70 % of the set speed on the simulated pen) does not count as a stall; the daemon has no spin-up
# grace of its own, so a shorter stall time stops every start (see docs/hazards.md). A 34 °C
# maximum: the injected heating trips in well under a second (the pens run near 28 °C).
LIMITS_A = limits_text(stall_time_ms=150, warn_temperature_c=32, max_temperature_c=34)
LIMITS_B = limits_text(stall_time_ms=150, warn_temperature_c=32, max_temperature_c=34,
                       areas={'cheeks': {'max_depth_mm': 1.0}, 'neck': {'max_depth_mm': 1.0}})
SERIALS = ('SOAK-A', 'SOAK-B')
# What the soak does next depends on the pen it picked: (action, weight) by the pen's State.
ACTIONS = {
    'idle': [('start', 50), ('reuse', 8), ('reload', 5), ('unplug', 3), ('kill', 3), ('term', 2), ('idle', 5)],
    'running': [('fault', 30), ('stop', 10), ('vanish', 10), ('pause', 6), ('reload', 8), ('unplug', 4),
                ('kill', 5), ('term', 3), ('idle', 15)],
    'fault': [('clear', 70), ('unplug', 5), ('kill', 5), ('reload', 5), ('idle', 5)],
}
ACTIONS['armed'] = ACTIONS['idle']
ACTIONS['paused'] = ACTIONS['running']


def default_steps():
    if valgrind():
        return 60
    if sanitized():
        return 600
    return 3000


class SoakFailure(AssertionError):
    pass


class Soak(SafetyTestCase):

    def test_soak(self):
        seed = int(os.environ.get('NEEDLED_SOAK_SEED') or random.SystemRandom().randrange(2**32))
        steps = int(os.environ.get('NEEDLED_SOAK_STEPS') or default_steps())
        epoch_steps = int(os.environ.get('NEEDLED_SOAK_EPOCH') or 500)
        print(f'\nsoak: seed {seed} (repeat with NEEDLED_SOAK_SEED={seed}), {steps} steps, '
              f'epochs of {epoch_steps}', flush=True)
        self.rng = random.Random(seed)
        self.verifier = subprocess.Popen([build_path('tests', 'safety', 'ledger-verify')], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True)
        self.addCleanup(self._stop_verifier)
        self.trace = collections.deque(maxlen=40)
        self.counts = collections.Counter()
        self.reasons = collections.Counter()   # how the sessions ended, over all epochs
        self.epoch = -1
        self.listen()
        step = 0
        try:
            while step < steps:
                if step % epoch_steps == 0:
                    self.new_epoch()
                pen = self.rng.choice(SERIALS)
                table = ACTIONS[self.state(pen)]
                action = self.rng.choices([a for a, _ in table], weights=[w for _, w in table])[0]
                what = getattr(self, 'act_' + action)(pen)
                self.counts[f'{action}:{what}'] += 1
                self.trace.append(f'{step}: {action} {pen}: {what}')
                self.check()
                step += 1
            self.end_epoch()
        except Exception as e:
            trace = '\n  '.join(self.trace)
            raise SoakFailure(f'soak seed {seed} failed at step {step}: {e}\nlast steps:\n  {trace}\n'
                              f'daemon log (tail):\n{self.daemon_log()[-3000:]}') from e
        summary = ', '.join(f'{k} {v}' for k, v in sorted(self.counts.items()))
        print(f'soak: {steps} steps, {self.total_sessions} sessions, {self.epoch + 1} epochs: {summary}', flush=True)
        print('soak: sessions ended by ' + ', '.join(f'{k} {v}' for k, v in sorted(self.reasons.items())), flush=True)

    # ---- epochs and the daemon ----

    def new_epoch(self):
        if self.epoch >= 0:
            self.end_epoch()
        else:
            self.total_sessions = 0
        self.epoch += 1
        self.state_dir = os.path.join(self.tmpdir, f'state-{self.epoch}')
        os.mkdir(self.state_dir, 0o700)
        self.limits = LIMITS_A
        self.known = {}            # sid -> {'cart', 'serial', 'reason' (None while running), 'expect'}
        self.used = set()          # cartridges that ran this epoch
        self.cart_counter = 0
        self.owners = {}           # sid -> separate owner connection
        self.start_needled(limits=self.limits)
        self.pens = {}
        for serial in SERIALS:
            self.plug(serial)

    def end_epoch(self):
        self.stop_daemon_recording('stopped', signal.SIGTERM)
        self.audit_verify()        # the real tool, once per epoch
        self.check(daemon_down=True)

    def listen(self):
        self.ended = []
        self._ended_match = self.bus.add_signal_receiver(
            lambda sid, reason: self.ended.append((str(sid), str(reason))), signal_name='SessionEnded',
            dbus_interface='org.needled1.Pen', bus_name='org.needled')
        self.addCleanup(self._ended_match.remove)

    def plug(self, serial):
        path = str(self.sim('AddPen', dbus.Dictionary({'serial': serial}, signature='sv')))
        self.pens[serial] = path
        self.fresh_cartridge(serial)

    def fresh_cartridge(self, serial):
        self.cart_counter += 1
        cart = f'E{self.epoch}-{serial}-{self.cart_counter}'
        self.insert(serial, cart)
        return cart

    def insert(self, serial, cart):
        pen = dbus.ObjectPath(self.pens[serial])
        if self.pprop(self.pens[serial], 'Cartridge')['state'] != 'none':
            self.sim('EjectCartridge', pen)
        self.sim('InsertCartridge', pen, cart, dbus.UInt32(12))

    def running_sids(self):
        return [sid for sid, k in self.known.items() if k['reason'] is None]

    def stop_daemon_recording(self, expect, signo):
        """Kills or terminates the daemon; every session it was running must end as expect."""
        self.drain()
        for sid in self.running_sids():
            self.known[sid]['expect'] = expect
        if signo == signal.SIGKILL:
            self.kill_needled()
        else:
            self.stop_needled()
        # Only now: an owner leaving first would end its session as client-vanished.
        for conn in self.owners.values():
            _close(conn)
        self.owners = {}
        self.drain()

    def restart(self):
        self.start_needled(limits=self.limits)
        self.pens = {}
        for serial in SERIALS:
            self.plug(serial)

    def _stop_verifier(self):
        self.verifier.stdin.close()
        self.verifier.wait(10)

    # ---- helpers ----

    def drain(self):
        ctx = GLib.MainContext.default()
        while ctx.pending():
            ctx.iteration(False)
        for sid, reason in self.ended:
            k = self.known.get(sid)
            if k is None:
                raise SoakFailure(f'SessionEnded for a session nobody started: {sid}')
            if k['reason'] is not None and k['reason'] != reason:
                raise SoakFailure(f'session {sid} ended twice: {k["reason"]}, then {reason}')
            k['reason'] = reason
            _close(self.owners.pop(sid, None))
        self.ended.clear()

    def state(self, serial):
        return self.pprop(self.pens[serial], 'State')

    def owner_bus(self, sid):
        return self.owners.get(sid, self.bus)

    def current_sid(self, serial):
        return self.pprop(self.pens[serial], 'SessionId')

    def wait_not_running(self, serial, timeout_s):
        wait_until(lambda: self.state(serial) not in ('running', 'paused'), timeout_s, f'{serial} to stop')
        self.wait_session_closed(serial)

    def wait_session_closed(self, serial):
        # The SessionEnded of what this pen ran has arrived.
        def closed():
            self.drain()
            return all(self.known[s]['reason'] is not None for s in self.running_sids()
                       if self.known[s]['serial'] == serial)
        wait_until(closed, 5, f'SessionEnded from {serial}')

    # ---- actions (each returns what happened, for the trace and the counts) ----

    def act_start(self, serial):
        pen = self.pens[serial]
        state = self.state(serial)
        if state not in ('idle', 'armed'):
            return f'skip-{state}'
        depth = self.rng.choice([0.8, 0.8, 1.2])
        duration = self.rng.choice([600] * 9 + [1])
        separate = self.rng.random() < 0.4
        bus = self.new_connection() if separate else self.bus
        cart = None
        try:
            # A pen may show idle and not answer: its session ended (a 1 s duration) just as it
            # stopped answering, before the heartbeat timed out. The daemon then refuses the
            # cartridge it cannot query with Fault, as it refuses a Start.
            if self.pprop(pen, 'Cartridge')['id'] in self.used:
                self.fresh_cartridge(serial)
            cart = self.pprop(pen, 'Cartridge')['id']
            self.pen_call(pen, 'LoadProfileData', profile_yaml(depth_mm=depth, duration_s=duration), bus=bus)
            sid = str(self.pen_call(pen, 'Start', dbus.Dictionary({}, signature='sv'), bus=bus))
        except dbus.exceptions.DBusException as e:
            name = e.get_dbus_name()
            if name == ERR + 'CartridgeSpent':
                raise SoakFailure(f'a fresh cartridge {cart} was refused as spent: {e.get_dbus_message()}')
            if name not in (ERR + 'InvalidProfile', ERR + 'LowBattery', ERR + 'Fault', ERR + 'WrongState'):
                raise
            if separate:
                _close(bus)
            return 'refused-' + name.rsplit('.', 1)[1]
        self.known[sid] = {'cart': cart, 'serial': serial, 'reason': None, 'expect': None}
        self.used.add(cart)
        self.total_sessions += 1
        if separate:
            self.owners[sid] = bus
        return 'started'

    def act_fault(self, serial):
        if self.state(serial) != 'running':
            return 'skip'
        fault = self.rng.choice(FAULTS)
        pen = dbus.ObjectPath(self.pens[serial])
        if fault == 'low-battery':
            self.sim('SetBattery', pen, dbus.UInt32(4))
        else:
            self.sim('InjectFault', pen, fault)
        self.wait_not_running(serial, 5)
        return fault

    def act_stop(self, serial):
        self.pen_call(self.pens[serial], 'Stop')
        self.wait_session_closed(serial)
        return 'ok'

    def act_vanish(self, serial):
        sid = self.current_sid(serial)
        if not sid or sid not in self.owners:
            return 'skip'
        _close(self.owners.pop(sid))
        self.wait_not_running(serial, 5)
        return 'ok'

    def act_pause(self, serial):
        sid = self.current_sid(serial)
        if not sid:
            return 'skip'
        bus = self.owner_bus(sid)
        try:
            if self.state(serial) == 'running':
                self.pen_call(self.pens[serial], 'Pause', bus=bus)
                return 'paused'
            self.pen_call(self.pens[serial], 'Resume', bus=bus)
            return 'resumed'
        except dbus.exceptions.DBusException as e:
            if e.get_dbus_name() in (ERR + 'WrongState', ERR + 'LowBattery', ERR + 'Fault'):
                return 'refused'   # the session ended meanwhile, or the pen is low
            raise

    def act_clear(self, serial):
        pen = self.pens[serial]
        path = dbus.ObjectPath(pen)
        if self.state(serial) != 'fault':
            return 'skip'
        self.sim('InjectFault', path, 'clear')
        self.sim('SetBattery', path, dbus.UInt32(100))
        try:
            wait_until(lambda: self._try_clear(pen), 3, 'the fault cleared')
        except AssertionError:
            return 'still-fault'
        return 'cleared'

    def _try_clear(self, pen):
        try:
            self.pen_call(pen, 'ClearFault')
            return True
        except dbus.exceptions.DBusException as e:
            if e.get_dbus_name() != ERR + 'Fault':
                raise
            return False

    def act_reuse(self, serial):
        if self.state(serial) not in ('idle', 'armed') or not self.used:
            return 'skip'
        cart = self.rng.choice(sorted(self.used))
        pen = self.pens[serial]
        try:
            self.insert(serial, cart)
            self.pen_call(pen, 'LoadProfileData', profile_yaml(depth_mm=0.8))
            self.pen_call(pen, 'Start', dbus.Dictionary({}, signature='sv'))
        except dbus.exceptions.DBusException as e:
            if e.get_dbus_name() == ERR + 'Fault':
                return 'refused-Fault'   # a pen that does not answer (see act_start): nothing ran
            if e.get_dbus_name() not in (ERR + 'CartridgeSpent', ERR + 'LowBattery'):
                raise
            self.fresh_cartridge(serial)
            return 'refused'
        raise SoakFailure(f'cartridge {cart} ran a second time')

    def act_reload(self, serial):
        self.limits = LIMITS_B if self.limits is LIMITS_A else LIMITS_A
        self.write_limits(self.limits)
        self.mgr('ReloadLimits')
        return 'B' if self.limits is LIMITS_B else 'A'

    def act_unplug(self, serial):
        self.sim('RemovePen', dbus.ObjectPath(self.pens[serial]))
        self.wait_session_closed(serial)
        self.plug(serial)
        return 'ok'

    def act_kill(self, serial):
        self.stop_daemon_recording('daemon-restart', signal.SIGKILL)
        self.restart()
        return 'ok'

    def act_term(self, serial):
        self.stop_daemon_recording('stopped', signal.SIGTERM)
        self.restart()
        return 'ok'

    def act_idle(self, serial):
        # Let time pass: short sessions complete, the pens drain their batteries a little.
        pump(0.05)
        return 'ok'

    # ---- the invariants ----

    def check(self, daemon_down=False):
        if daemon_down:
            self.start_needled(limits=self.limits)
        running_now = {}
        for serial in SERIALS if not daemon_down else ():
            sid = self.current_sid(serial)
            if sid:
                running_now[sid] = serial
        history = unwrap(self.mgr('GetHistory', dbus.Dictionary({}, signature='sv')))
        self.drain()
        if len(history) >= 1000:
            raise SoakFailure('more sessions than GetHistory returns: lower NEEDLED_SOAK_EPOCH')
        by_id = {e['id']: e for e in history}
        # Every session ever started is there, as we know it.
        for sid, k in self.known.items():
            e = by_id.get(sid)
            if e is None:
                raise SoakFailure(f'session {sid} (cartridge {k["cart"]}) is missing from GetHistory')
            if e['cartridge'] != k['cart']:
                raise SoakFailure(f'session {sid}: cartridge {e["cartridge"]}, started with {k["cart"]}')
            if e['reason'] == '':
                if sid not in running_now:
                    raise SoakFailure(f'session {sid} has no end in the ledger but is not running: {e}')
                continue
            if e['end'] == 0 or e['end'] < e['start']:
                raise SoakFailure(f'session {sid} ended ({e["reason"]}) without a sane end time: {e}')
            reason = e['reason']
            if reason not in REASONS and not (reason.startswith('fault:') and reason[6:] in FAULT_CODES):
                raise SoakFailure(f'session {sid}: reason {reason!r} is not in the contract')
            if k['reason'] is not None and k['reason'] != reason:
                raise SoakFailure(f'session {sid}: SessionEnded said {k["reason"]}, the ledger {reason}')
            if k['expect'] is not None and k['reason'] is None and reason != k['expect']:
                raise SoakFailure(f'session {sid}: expected {k["expect"]} after the daemon went, ledger {reason}')
            if k['expect'] is not None:
                k['reason'] = reason
        for e in history:
            if e['id'] not in self.known:
                raise SoakFailure(f'GetHistory has a session nobody started: {e}')
        # Single use: no cartridge in two sessions.
        per_cart = collections.Counter(e['cartridge'] for e in history)
        twice = [c for c, n in per_cart.items() if n > 1]
        if twice:
            raise SoakFailure(f'cartridges in more than one session: {twice}')
        # The audit chain.
        self.verifier.stdin.write(os.path.join(self.state_dir, 'ledger.sqlite') + '\n')
        self.verifier.stdin.flush()
        verdict = self.verifier.stdout.readline().strip()
        if not verdict.startswith('intact'):
            raise SoakFailure(f'audit verification: {verdict}')
        if daemon_down:
            self.reasons.update(e['reason'] for e in history)
            self.stop_needled()


def _close(conn):
    if conn is None:
        return
    try:
        conn.close()
    except Exception:  # noqa: BLE001 - closing twice is fine
        pass


if __name__ == '__main__':
    main()
