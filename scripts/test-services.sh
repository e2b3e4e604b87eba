#!/usr/bin/env bash
# Installs (apt-get, as root) and starts what the test suite needs when it is missing:
# the Mosquitto binary (tests start private brokers from deploy/mosquitto/mosquitto.conf),
# a PostgreSQL server on 127.0.0.1:5432 (EDGEOPS_TEST_POSTGRES_URL overrides it), and the
# Cortex-M toolchain the firmware tests build with (arm-none-eabi-gcc with newlib, QEMU), and
# Debian's Chromium for the dashboard's browser tests, and what the HIL rig's Linux boards
# use (iproute2, libfaketime, nftables, ping).
set -euo pipefail

apt_updated=0
install_pkgs() {  # install_pkgs PACKAGE...
  if [ "$(id -u)" != 0 ]; then
    echo "test-services: $* missing and not root: install them (apt-get install $*)" >&2
    exit 1
  fi
  if [ "$apt_updated" = 0 ]; then apt-get update -qq; apt_updated=1; fi
  echo "test-services: installing $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
need_pkg() {  # need_pkg COMMAND PACKAGE...
  if command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; then return 0; fi
  shift
  install_pkgs "$@"
}

need_pkg mosquitto mosquitto
need_pkg pg_isready postgresql postgresql-client
need_pkg arm-none-eabi-gcc gcc-arm-none-eabi libnewlib-arm-none-eabi
need_pkg qemu-system-arm qemu-system-arm
need_pkg g++ g++
# the dashboard's browser tests drive Debian's Chromium (Playwright never downloads one)
need_pkg chromium chromium fonts-dejavu-core
# the rig's Linux boards: network namespaces, veth pairs and tc (iproute2)
need_pkg ip iproute2
# the rig's Linux boards run agents with a skewed wall clock (libfaketime)
need_pkg faketime faketime libfaketime
# packet loss on the rig's links without netem (nftables in a namespace), measured with ping
need_pkg nft nftables
need_pkg ping iputils-ping
# newlib is a package of its own: the cross compiler may be there without it
if [ ! -e "$(arm-none-eabi-gcc -print-file-name=libc_nano.a)" ] \
  && [ ! -d /usr/lib/arm-none-eabi/newlib ]; then
  install_pkgs libnewlib-arm-none-eabi
fi

if [ -z "${EDGEOPS_TEST_POSTGRES_URL:-}" ]; then
  if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    echo "test-services: starting PostgreSQL"
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
    for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
  fi
  pg_isready -h 127.0.0.1 -p 5432
fi
