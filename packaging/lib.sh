# Shared by the scripts in packaging/. Source it; do not run it.

# Installs those of the named Debian packages that are not installed yet (no recommends).
apt_install() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "apt-get install ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
}

# The number of the Debian release named $1 (the releases this project builds for), or fails.
debian_number() {
  case "$1" in
    bookworm) echo 12 ;;
    trixie) echo 13 ;;
    *) return 1 ;;
  esac
}

# Starts the Debian PostgreSQL cluster if it is down. Under systemd, through systemctl; without
# systemd as PID 1 (containers, CI), with pg_ctlcluster directly.
start_postgres() {
  if pg_isready -q -h /var/run/postgresql; then
    return 0
  fi
  if [ -d /run/systemd/system ]; then
    systemctl start postgresql
  else
    local ver cluster
    read -r ver cluster < <(pg_lsclusters --no-header | awk 'NR==1 {print $1, $2}')
    if [ -z "${ver:-}" ]; then
      ver=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
      cluster=main
      pg_createcluster "$ver" "$cluster"
    fi
    pg_ctlcluster "$ver" "$cluster" start || pg_ctlcluster "$ver" "$cluster" status
  fi
  for _ in $(seq 1 100); do
    pg_isready -q -h /var/run/postgresql && return 0
    sleep 0.1
  done
  echo "PostgreSQL did not start; see /var/log/postgresql/" >&2
  return 1
}

# Builds outside the source tree by default: the PostgreSQL helper runs this binary as the
# postgres user, so every directory above it must be world-traversable, which a checkout under
# a private home may not be. Also lets repeated runs reuse the build.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/homelab-matrix/target}
mkdir -p "$CARGO_TARGET_DIR"
# Add traversal only: the parent may be a shared directory such as /tmp (mode 1777).
chmod a+x "$(dirname "$CARGO_TARGET_DIR")"
chmod a+rx "$CARGO_TARGET_DIR"

# The Rust toolchain a source build needs (Cargo.toml's rust-version), put on PATH from
# rustup's place when it is there. Without one it prints the exact commands to get it and
# fails, before anything is installed. $1 names the caller in the message.
need_rust() {
  local want have=""
  want=$(sed -n 's/^rust-version = "\(.*\)"$/\1/p' Cargo.toml)
  if [ -x "${HOME:-/root}/.cargo/bin/cargo" ]; then
    PATH=${HOME:-/root}/.cargo/bin:$PATH
    export PATH
  fi
  if command -v cargo >/dev/null 2>&1 && have=$(rustc --version 2>/dev/null | awk '{print $2}') \
    && dpkg --compare-versions "$have" ge "$want"; then
    return 0
  fi
  cat >&2 <<MSG
$1: building homelab-matrix from source needs Rust $want or newer (cargo and rustc), and this
machine has ${have:-none}. Debian's own rustc is older than that. Get it with rustup (as root,
into ~/.cargo; nothing else on the system changes), then run this again:

  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain $want
  . "\$HOME/.cargo/env"

Nothing was installed yet.
MSG
  return 1
}

# What a cross build for Debian architecture $1 (Rust target $2, GNU triplet $3) needs on
# this host: the cross compiler, the target's libc as a foreign architecture (dpkg-shlibdeps
# reads its symbols), rustup's target, and qemu-user's binfmt handler (the build runs the
# binary it made). Idempotent.
cross_tools() {
  local arch=$1 rust=$2 gnu=$3
  if ! dpkg --print-foreign-architectures | grep -qx "$arch"; then
    dpkg --add-architecture "$arch"
    apt-get update -qq
  fi
  # libsqlite3-sys links the system's sqlite (the bot's crypto store), as the native build does.
  apt_install "gcc-$gnu" "libc6-dev-$arch-cross" qemu-user-static binfmt-support "libc6:$arch" \
    "libsqlite3-dev:$arch"
  rustup target list --installed | grep -qx "$rust" || rustup target add "$rust"
  if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  fi
  local q=qemu-${rust%%-*}
  [ -e "/proc/sys/fs/binfmt_misc/$q" ] || update-binfmts --enable "$q"
}

# Sets this shell up to cross-build for Debian architecture $1 (only arm64 on amd64 is set up):
# the tools (cross_tools), cargo's target, the target's linker and C compiler (ring and
# mimalloc compile C), and a target dir of its own: cargo locks one for a whole build, and a
# cross build shares nothing with the native ones, so it can run beside them.
cross_env() {
  local build rust gnu
  build=$(dpkg --print-architecture)
  case "$build/$1" in
    amd64/arm64) rust=aarch64-unknown-linux-gnu; gnu=aarch64-linux-gnu ;;
    *) echo "cross-building $1 on $build is not set up; arm64 on amd64 is" >&2; return 2 ;;
  esac
  cross_tools "$1" "$rust" "$gnu"
  export CARGO_BUILD_TARGET=$rust
  export CARGO_TARGET_DIR=$CARGO_TARGET_DIR-$1
  mkdir -p "$CARGO_TARGET_DIR"
  chmod a+rx "$CARGO_TARGET_DIR"
  local t
  t=$(echo "$rust" | tr 'a-z-' 'A-Z_')
  export "CARGO_TARGET_${t}_LINKER=$gnu-gcc"
  export "CC_${rust//-/_}=$gnu-gcc" "AR_${rust//-/_}=$gnu-ar"
  # pkg-config for the target only: arm64's .pc files (build scripts' own stay native).
  export "PKG_CONFIG_ALLOW_CROSS_${rust//-/_}=1" "PKG_CONFIG_LIBDIR_${rust//-/_}=/usr/lib/$gnu/pkgconfig:/usr/share/pkgconfig"
  # debhelper: the build runs what it built, through qemu-user's binfmt handler.
  export DEB_BUILD_OPTIONS="${DEB_BUILD_OPTIONS:+$DEB_BUILD_OPTIONS }crossbuildcanrunhostbinaries nocheck"
}

# The log filter of the quick start's foreground run: Synapse's own lines from warnings up,
# and the operator's RUST_LOG after it. The appliance adds RUST_LOG to its default filter
# (src/logging.rs), so neither brings back the chatter the default keeps out.
quickstart_log_filter() {
  echo "child=warn${RUST_LOG:+,$RUST_LOG}"
}
