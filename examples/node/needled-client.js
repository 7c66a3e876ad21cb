#!/usr/bin/env node
// needled-client.js: a small needled client in JavaScript on Node with dbus-next, as an
// Electron-style clinic front end would be.
//
// Lists the pens through the object manager (the Manager is one of its objects), follows a pen's
// property changes, arms an installed profile, runs a short session, reads the telemetry records
// from a pipe (OpenTelemetryPipe: libuv reads a pipe without blocking; it refuses the
// SOCK_SEQPACKET socket of OpenTelemetry), handles a named error and prints the figures the
// ledger recorded (SessionRecorded).
//
//     node needled-client.js [--session] SERIAL [PROFILE]
//
// Receiving a file descriptor needs dbus-next's optional native module usocket and a bus
// connection made with negotiateUnixFd: without them the reply carrying the fd never arrives.
// And dbus-next 0.10.2 hands every fd received so far to the next message it parses, not to
// the message whose header declares it (lib/message.js reads with stream.read(length, null)):
// a signal that arrives in the same read as the reply takes the fd, and the reply then throws
// "No FDs available" outside any promise (the Hello reply sent in the same read as an early
// call's reply takes the fd just as well). So fds are asked for on a connection of their own
// that subscribes to nothing, only once the bus has sent all it sends unasked (the Hello reply,
// then NameAcquired), one call at a time: then the reply is the only message in its read.
// Exit status 0 when the session ran, ended "stopped" and the telemetry was consecutive.
'use strict';

const net = require('net');
const dbus = require('dbus-next');

const NAME = 'org.needled';
const ROOT = '/org/needled';
const MANAGER = 'org.needled1.Manager';
const PEN = 'org.needled1.Pen';
const PROPERTIES = 'org.freedesktop.DBus.Properties';
const OBJECT_MANAGER = 'org.freedesktop.DBus.ObjectManager';
const STOP_AFTER_MS = 1500;
const GIVE_UP_AFTER_MS = 15000;
const FD_CALL_TIMEOUT_MS = 10000;

// docs/telemetry.md, record version 1 (little-endian); a later version only appends fields.
const RECORD_VERSION = 1;
const RECORD_MIN_SIZE = 72;

function decodeRecord (buf, at) {
  return {
    version: buf.readUInt16LE(at),
    size: buf.readUInt16LE(at + 2),
    sequence: buf.readUInt32LE(at + 4),
    deviceTimeUs: buf.readBigUInt64LE(at + 8),
    hostTimeUs: buf.readBigUInt64LE(at + 16),
    dropped: buf.readUInt32LE(at + 24),
    flags: buf.readUInt32LE(at + 28),
    depthMm: buf.readDoubleLE(at + 32),
    speedHz: buf.readDoubleLE(at + 40),
    currentMa: buf.readDoubleLE(at + 48),
    temperatureC: buf.readDoubleLE(at + 56),
    batteryPercent: buf.readUInt8(at + 64)
  };
}

// Cuts the byte stream of the pipe into records (each written whole by the daemon) and counts
// gaps in the sequence numbers; the daemon's own loss count is in every record.
class TelemetryReader {
  constructor (fd) {
    this.pending = Buffer.alloc(0);
    this.records = 0;
    this.gaps = 0;
    this.dropped = 0;
    this.nextSequence = null;
    this.last = null;
    this.error = null;
    this.stream = new net.Socket({ fd, readable: true, writable: false });
    this.stream.on('data', (chunk) => this.take(chunk));
    this.stream.on('error', (err) => { this.error = err; });
  }

  take (chunk) {
    let buf = this.pending.length ? Buffer.concat([this.pending, chunk]) : chunk;
    let at = 0;
    while (buf.length - at >= 4) {
      const version = buf.readUInt16LE(at);
      const size = buf.readUInt16LE(at + 2);
      if (version !== RECORD_VERSION || size < RECORD_MIN_SIZE) {
        this.error = new Error(`telemetry record of version ${version}, size ${size}: not understood`);
        this.stream.destroy();
        return;
      }
      if (buf.length - at < size) {
        break;
      }
      const record = decodeRecord(buf, at);
      at += size;
      if (this.nextSequence !== null && record.sequence !== this.nextSequence) {
        this.gaps += (record.sequence - this.nextSequence) >>> 0;
      }
      this.nextSequence = (record.sequence + 1) >>> 0;
      this.dropped = record.dropped;
      this.records++;
      this.last = record;
    }
    this.pending = buf.subarray(at);
  }

  close () {
    this.stream.destroy();
  }
}

function withTimeout (promise, ms, what) {
  let timer;
  const timeout = new Promise((resolve, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no reply in ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function usocketAvailable () {
  try {
    require('usocket');
    return true;
  } catch (err) {
    return false;
  }
}

async function main () {
  const args = process.argv.slice(2).filter((a) => a !== '--session');
  const onSessionBus = process.argv.includes('--session');
  const serial = args[0];
  const profile = args[1] || 'acne-scars-cheeks';
  if (!serial) {
    console.error('usage: needled-client.js [--session] SERIAL [PROFILE]');
    return 2;
  }
  // Without usocket dbus-next falls back to net.Socket, which passes no fds: say so now rather
  // than wait for a reply that never comes.
  if (!usocketAvailable()) {
    console.error('dbus-next cannot receive file descriptors: its optional module usocket is not built (npm ci)');
    return 1;
  }
  const connect = (options) => onSessionBus ? dbus.sessionBus(options) : dbus.systemBus(options);
  const bus = connect({});
  try {
    return await run(bus, connect, serial, profile);
  } finally {
    bus.disconnect();
  }
}

// A connection that passes fds, resolved once the bus has greeted it (NameAcquired, which the
// bus sends right after the Hello reply): from then on only replies to its calls arrive.
function connectForFds (connect) {
  const fdBus = connect({ negotiateUnixFd: true });
  const greeted = new Promise((resolve, reject) => {
    // NameAcquired may be parsed before the Hello reply's promise has named the connection.
    let acquired = null;
    let connected = false;
    const settle = () => {
      if (connected && acquired === fdBus.name) {
        fdBus.removeListener('message', onMessage);
        resolve(fdBus);
      }
    };
    const onMessage = (msg) => {
      if (msg.type === dbus.MessageType.SIGNAL && msg.sender === 'org.freedesktop.DBus' &&
          msg.member === 'NameAcquired') {
        acquired = msg.body[0];
        settle();
      }
    };
    fdBus.on('message', onMessage);
    fdBus.once('connect', () => { connected = true; settle(); });
    fdBus.once('error', reject);
  });
  return withTimeout(greeted, FD_CALL_TIMEOUT_MS, 'connecting for fds').catch((err) => {
    fdBus.disconnect();
    throw err;
  });
}

// Calls a method that returns one fd, on a connection that receives nothing but this reply.
async function callForFd (connect, path, iface, member) {
  const fdBus = await connectForFds(connect);
  try {
    const reply = await withTimeout(fdBus.call(new dbus.Message({ destination: NAME, path, interface: iface, member })),
                                    FD_CALL_TIMEOUT_MS, member);
    if (reply.signature !== 'h') {
      throw new Error(`${member} answered (${reply.signature}), not (h)`);
    }
    return reply.body[0];
  } finally {
    fdBus.disconnect();
  }
}

async function run (bus, connect, serial, profile) {
  // Every object, the Manager included, through the object manager at the root.
  const root = await bus.getProxyObject(NAME, ROOT);
  const manager = root.getInterface(MANAGER);
  const objects = await root.getInterface(OBJECT_MANAGER).GetManagedObjects();
  const managerProps = objects[ROOT] && objects[ROOT][MANAGER];
  if (!managerProps) {
    console.error('the object manager does not list the Manager');
    return 1;
  }
  console.log(`needled ${managerProps.Version.value}, features ${managerProps.Features.value.join(', ')}`);
  for (const [path, interfaces] of Object.entries(objects)) {
    if (interfaces[PEN]) {
      console.log(`pen ${interfaces[PEN].Serial.value} ${interfaces[PEN].State.value} (${path})`);
    }
  }

  // A named error: a serial nobody has.
  try {
    await manager.FindPen('NO-SUCH-PEN');
    console.error('FindPen found a pen that does not exist');
    return 1;
  } catch (err) {
    if (!(err instanceof dbus.DBusError)) {
      throw err;
    }
    console.log(`named error: ${err.type}: ${err.text}`);
    if (err.type !== 'org.needled1.Error.UnknownPen') {
      return 1;
    }
  }

  const path = await manager.FindPen(serial);
  const penObject = await bus.getProxyObject(NAME, path);
  const pen = penObject.getInterface(PEN);
  const result = { propertyChanges: 0, reason: null, figures: null };

  penObject.getInterface(PROPERTIES).on('PropertiesChanged', (iface, changed) => {
    if (iface !== PEN) {
      return;
    }
    for (const [key, variant] of Object.entries(changed)) {
      result.propertyChanges++;
      if (key === 'State' || key === 'Fault' || key === 'SessionId') {
        console.log(`  ${key} = ${JSON.stringify(variant.value)}`);
      }
    }
  });
  pen.on('SessionRecorded', (sessionId, figures) => { result.figures = figures; });
  const ended = new Promise((resolve) => {
    pen.on('SessionEnded', (sessionId, reason) => {
      result.reason = reason;
      resolve();
    });
  });

  // The pipe's read end comes as a plain fd number of our own.
  const fd = await callForFd(connect, path, PEN, 'OpenTelemetryPipe');
  const telemetry = new TelemetryReader(fd);

  await pen.LoadProfile(profile);
  const sessionId = await pen.Start({ label: new dbus.Variant('s', 'example') });
  console.log(`session ${sessionId} started`);
  const stopTimer = setTimeout(() => {
    pen.Stop().catch((err) => console.error(`Stop: ${err.message}`));
  }, STOP_AFTER_MS);
  let giveUpTimer;
  const gaveUp = new Promise((resolve) => { giveUpTimer = setTimeout(resolve, GIVE_UP_AFTER_MS); });
  await Promise.race([ended, gaveUp]);
  clearTimeout(stopTimer);
  clearTimeout(giveUpTimer);
  // SessionRecorded is sent before SessionEnded; records already in the pipe come with the next
  // turns of the loop.
  await new Promise((resolve) => setTimeout(resolve, 100));
  telemetry.close();

  const figures = result.figures || {};
  const strokes = figures.strokes ? Number(figures.strokes.value) : 0;
  const duration = figures.duration_s ? figures.duration_s.value : 0;
  console.log(`ended: ${result.reason || '(none)'} (${duration.toFixed(1)} s, ${strokes} strokes)`);
  console.log(`telemetry: ${telemetry.records} records, ${telemetry.gaps} gaps, ${telemetry.dropped} dropped; ` +
              `${result.propertyChanges} property changes`);
  if (telemetry.last) {
    const r = telemetry.last;
    console.log(`last record: #${r.sequence} depth ${r.depthMm.toFixed(2)} mm, speed ${r.speedHz.toFixed(1)} Hz, ` +
                `${r.temperatureC.toFixed(1)} °C, battery ${r.batteryPercent} %, flags 0x${r.flags.toString(16)}`);
  }
  if (telemetry.error) {
    console.error(`telemetry: ${telemetry.error.message}`);
    return 1;
  }
  const ok = result.reason === 'stopped' && strokes > 0 && telemetry.records > 100 &&
             telemetry.gaps === telemetry.dropped;
  return ok ? 0 : 1;
}

main().then((status) => { process.exitCode = status; }, (err) => {
  console.error(err instanceof dbus.DBusError ? `${err.type}: ${err.text}` : err.stack || String(err));
  process.exitCode = 1;
});
