# shellcheck shell=bash
# Shared bootstrap, sourced by scripts/test and scripts/dev.
#
#   bootstrap_python      .venv with the project installed (editable, [test] extras);
#                         re-installs only when pyproject.toml is newer than the stamp.
#   bootstrap_postgres    PostgreSQL server binaries (unless TEST_DATABASE_URL is set).
#   bootstrap_pgtap       pgTAP extension files + pg_prove (+ psql).
#
# As root on Debian/Ubuntu, missing system packages are installed with apt-get;
# otherwise we print what to install and exit 1.

set -euo pipefail

BARNUM_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$BARNUM_ROOT"

VENV="$BARNUM_ROOT/.venv"
STAMP="$VENV/.barnum-installed"

say() { printf 'bootstrap: %s\n' "$*" >&2; }
die() { printf 'bootstrap: %s\n' "$*" >&2; exit 1; }

_can_apt() { [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; }

_apt_updated=0
# apt_install PKG... — install as root via apt-get, or fail with what to install.
apt_install() {
  if ! _can_apt; then
    die "missing system packages; please install: $* (e.g. sudo apt-get install -y $*)"
  fi
  if [ "$_apt_updated" -eq 0 ]; then
    say "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    _apt_updated=1
  fi
  say "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

_find_python() {
  local c
  for c in ${PYTHON:-} python3 python3.13 python3.12 python3.11; do
    if command -v "$c" >/dev/null 2>&1 &&
       "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      command -v "$c"
      return 0
    fi
  done
  return 1
}

bootstrap_python() {
  local py
  if ! py="$(_find_python)"; then
    if _can_apt; then
      apt_install python3 python3-venv
    fi
    py="$(_find_python)" || die "Python 3.11+ is required (set PYTHON=/path/to/python3.11)"
  fi
  if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    say "removing broken $VENV (no pip)"
    rm -rf "$VENV"
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV with $py"
    if ! "$py" -m venv "$VENV" >/dev/null 2>&1; then
      rm -rf "$VENV"
      # Debian/Ubuntu ship venv/ensurepip separately.
      local ver
      ver="$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
      apt_install "python${ver}-venv" || apt_install python3-venv
      "$py" -m venv "$VENV" || die "python -m venv failed"
    fi
  fi
  if [ ! -f "$STAMP" ] || [ "$BARNUM_ROOT/pyproject.toml" -nt "$STAMP" ]; then
    say "pip install -e '.[test]'"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$BARNUM_ROOT[test]"
    touch "$STAMP"
  fi
}

# Highest PostgreSQL major version whose server binaries are installed.
pg_major() {
  local d best=""
  for d in /usr/lib/postgresql/*/bin/postgres; do
    [ -x "$d" ] || continue
    d="${d#/usr/lib/postgresql/}"; d="${d%%/*}"
    if [ -z "$best" ] || [ "$d" -gt "$best" ]; then best="$d"; fi
  done
  if [ -z "$best" ] && command -v pg_ctl >/dev/null 2>&1; then
    best="$(pg_ctl --version | sed -E 's/[^0-9]*([0-9]+).*/\1/')"
  fi
  printf '%s' "$best"
}

bootstrap_postgres() {
  if [ -n "${TEST_DATABASE_URL:-}" ]; then
    return 0
  fi
  if [ -n "$(pg_major)" ]; then
    return 0
  fi
  if _can_apt && [ ! -e /etc/postgresql-common/createcluster.conf ]; then
    # We only need the binaries: the tests run their own throwaway cluster.
    mkdir -p /etc/postgresql-common
    echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf
  fi
  apt_install postgresql
  [ -n "$(pg_major)" ] || die "PostgreSQL server binaries still missing after install"
}

bootstrap_pgtap() {
  local pkgs=() major sharedir
  command -v psql >/dev/null 2>&1 || pkgs+=(postgresql-client)
  command -v pg_prove >/dev/null 2>&1 || pkgs+=(libtap-parser-sourcehandler-pgtap-perl)
  if [ -z "${TEST_DATABASE_URL:-}" ]; then
    # The extension must be installed for the server the tests will start.
    major="$(pg_major)"
    sharedir="/usr/share/postgresql/$major"
    if [ ! -d "$sharedir" ] && command -v pg_config >/dev/null 2>&1; then
      sharedir="$(pg_config --sharedir)"
    fi
    [ -f "$sharedir/extension/pgtap.control" ] || pkgs+=("postgresql-$major-pgtap")
  fi
  if [ "${#pkgs[@]}" -gt 0 ]; then
    apt_install "${pkgs[@]}"
  fi
}
