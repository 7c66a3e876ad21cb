#!/usr/bin/python3
"""Installs the Node example's packages and runs it against the simulator.

    run-example.py RUNNER NEEDLED SOURCE_ROOT WORKDIR NODE NPM

Copies examples/node (package.json, package-lock.json, needled-client.js) into WORKDIR in the
build tree and runs `npm ci` there, exactly the locked packages, when the lockfile or the
node binary changed since the last run (a stamp file). usocket, dbus-next's native module for
fd passing, is built by node-gyp against the headers that come with node (libnode-dev on
Debian, /usr/include/node), never headers downloaded at test time; without them this fails
and says so. Then RUNNER (run-against-simulator.py) runs the client: exits with its status.
"""

import hashlib
import os
import shutil
import subprocess
import sys

FILES = ('package.json', 'package-lock.json', 'needled-client.js')


def node_headers(node):
    """The prefix whose include/node holds the headers of this node, or None."""
    exe = subprocess.run([node, '-p', 'process.execPath'], check=True, capture_output=True, text=True).stdout.strip()
    prefix = os.path.dirname(os.path.dirname(os.path.realpath(exe)))
    return prefix if os.path.exists(os.path.join(prefix, 'include', 'node', 'common.gypi')) else None


def stamp_of(source_dir, node):
    h = hashlib.sha256()
    for name in ('package.json', 'package-lock.json'):
        with open(os.path.join(source_dir, name), 'rb') as f:
            h.update(f.read())
    h.update(subprocess.run([node, '-p', 'process.execPath + " " + process.version + " " + process.versions.modules'],
                            check=True, capture_output=True).stdout)
    return h.hexdigest()


def main():
    runner, needled, source_root, workdir, node, npm = sys.argv[1:7]
    source_dir = os.path.join(source_root, 'examples', 'node')
    os.makedirs(workdir, exist_ok=True)
    for name in FILES:
        shutil.copyfile(os.path.join(source_dir, name), os.path.join(workdir, name))

    stamp_path = os.path.join(workdir, '.npm-ci-stamp')
    stamp = stamp_of(source_dir, node)
    try:
        with open(stamp_path, encoding='ascii') as f:
            installed = f.read().strip() == stamp
    except FileNotFoundError:
        installed = False
    if not installed:
        prefix = node_headers(node)
        if not prefix:
            sys.stderr.write(f'no headers for {node} (include/node/common.gypi beside it): on Debian install '
                             'libnode-dev; node-gyp must not download them at test time\n')
            return 1
        # node-gyp (usocket's install script) and npm read these; nodedir keeps node-gyp offline.
        env = dict(os.environ, npm_config_nodedir=prefix, npm_config_audit='false', npm_config_fund='false',
                   npm_config_update_notifier='false')
        r = subprocess.run([npm, 'ci'], cwd=workdir, env=env)
        if r.returncode != 0:
            sys.stderr.write(f'npm ci failed ({r.returncode})\n')
            return 1
        # usocket is optional to dbus-next: npm ci passes when its build fails. Say why it failed.
        if subprocess.run([node, '-e', 'require("usocket")'], cwd=workdir, capture_output=True).returncode != 0:
            subprocess.run([npm, 'rebuild', 'usocket', '--foreground-scripts'], cwd=workdir, env=env)
            sys.stderr.write('usocket (dbus-next\'s fd passing) did not build: it needs python3, make, g++ and '
                             'the node headers with libuv\'s (libnode-dev)\n')
            return 1
        with open(stamp_path, 'w', encoding='ascii') as f:
            f.write(stamp + '\n')

    return subprocess.run(['/usr/bin/python3', runner, needled, source_root, '--',
                           node, os.path.join(workdir, 'needled-client.js'), '--session']).returncode


if __name__ == '__main__':
    sys.exit(main())
