# Sourced by scripts/demo and scripts/test: make .venv (once) and install pg-reaper into it.
# Works on a fresh Debian/Ubuntu machine with Python 3.11+; as root it installs python3-venv
# when the distribution left it out.
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    rm -rf .venv
    if ! "$python" -m venv .venv >/dev/null 2>&1; then
        rm -rf .venv
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
            "$python" -m venv .venv
        else
            echo "pg-reaper: '$python -m venv' failed: install python3-venv (apt-get install python3-venv)" >&2
            exit 1
        fi
    fi
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[${PG_REAPER_EXTRAS:-dev}]"
