#!/bin/bash
# Interop check: our `stripe_server` / `ubiblk://` client against upstream ubicloud/ubiblk
# v0.5.1's `remote-stripe-server` and `type = "remote"` stripe source, over loopback, TLS 1.2
# PSK-AES256-GCM-SHA384.
#
#   ./run.sh build   build isa-l_crypto (installed to /usr, as upstream's build.rs hardcodes),
#                    upstream v0.5.1 and a clone of this repository's HEAD, all under $INTEROP_DIR
#   ./run.sh test    run the interop tests (needs the binaries); results in run/results.txt
#   ./run.sh         both
#
# Not part of CI (isa-l_crypto is a C build with nasm). Needs root (apt, /usr) and network to
# the two repositories (or local mirrors: UPSTREAM_REPO, ISAL_REPO).
# Env: INTEROP_DIR (work dir, default /tmp/ubiblk-interop), OURS_BIN (dir with our vhost-backend, init-metadata; default target-ours/release),
#      UP_BIN (dir with upstream's binaries; default target-upstream/release).
set -u
W=${INTEROP_DIR:-/tmp/ubiblk-interop}
T=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$T/../.." && pwd)
UPSTREAM_REPO=${UPSTREAM_REPO:-https://github.com/ubicloud/ubiblk}
ISAL_REPO=${ISAL_REPO:-https://github.com/intel/isa-l_crypto}
mkdir -p "$W"
UP_TAG=${UP_TAG:-v0.5.1}
ISAL_TAG=${ISAL_TAG:-v2.25.0}   # upstream's .github/workflows/prebuild-ci-deps.yaml
OURS_BIN=${OURS_BIN:-$W/target-ours/release}
UP_BIN=${UP_BIN:-$W/target-upstream/release}

build() {
  set -e
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq nasm autoconf automake libtool clang libclang-dev make pkg-config \
    perl cmake xxd openssl libssl-dev python3 >/dev/null
  # isa-l_crypto (upstream build.rs: /usr/include/isa-l_crypto.h, static /usr/lib/libisal_crypto.a)
  [ -d $W/isa-l_crypto ] || git clone -q $ISAL_REPO $W/isa-l_crypto
  ( cd $W/isa-l_crypto && git checkout -q $ISAL_TAG && ./autogen.sh >/dev/null &&
    CFLAGS="-O2 -pipe -fPIC" ./configure --prefix=/usr --libdir=/usr/lib --enable-static \
      --enable-shared --disable-dependency-tracking >/dev/null &&
    nice make -j2 >/dev/null && make install >/dev/null )
  # upstream
  [ -d $W/upstream ] || git clone -q $UPSTREAM_REPO $W/upstream
  ( cd $W/upstream && git checkout -q $UP_TAG &&
    CARGO_TARGET_DIR=$W/target-upstream nice -n 10 cargo build --release --locked -j 2 \
      --bin remote-stripe-server --bin vhost-backend --bin init-metadata \
      --bin remote-stripe-shell --bin dump-metadata )
  # ours: a clone of this repository's HEAD
  [ -d $W/ours ] || git clone -q $REPO $W/ours
  ( cd $W/ours && CARGO_TARGET_DIR=$W/target-ours nice -n 10 cargo build --release -j 2 \
      --bin vhost-backend --bin init-metadata --bin dump-metadata --bin vhost-frontend )
  set +e
}

# ---------------------------------------------------------------------------------------
R=$W/run
PIDS=()
RESULTS=$R/results.txt
MiB=$((1 << 20))
ID=interop-id
UP_PORT=45551
OUR_PORT=45552

cleanup() { for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null; done; PIDS=(); sleep 0.3; }
trap cleanup EXIT
result() { echo "$1: $2" | tee -a $RESULTS; }
start() { # start NAME LOG CMD...: background process, pid remembered
  local name=$1 log=$2; shift 2
  "$@" > "$log" 2>&1 &
  local pid=$!
  PIDS+=($pid)
  eval "PID_$name=$pid"
}
stop() { local v="PID_$1"; kill "${!v}" 2>/dev/null; wait "${!v}" 2>/dev/null; }
wait_port() { for i in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; return 1; }

# upstream TOML fragments
up_secret() { # up_secret NAME FILE
  printf '[secrets.%s]\nsource.file = "%s"\n' "$1" "$2"; }
up_danger() { printf '[danger_zone]\nenabled = true\nallow_unencrypted_disk = true\nallow_secret_over_regular_file = true\n'; }

up_server() { # up_server DIR CONFIG_TOML IDENTITY KEYFILE -> upstream remote-stripe-server on UP_PORT
  local d=$1 cfg=$2 id=$3 key=$4
  cat > $d/listen.toml <<EOF
[server]
address = "127.0.0.1:$UP_PORT"

[server.psk]
identity = "$id"
secret.ref = "psk"

$(up_secret psk $key)

[danger_zone]
enabled = true
allow_secret_over_regular_file = true
EOF
  start upsrv $d/upstream-server.log env RUST_LOG=info $UP_BIN/remote-stripe-server --config $cfg --listen-config $d/listen.toml
  wait_port $UP_PORT || { echo "upstream server did not listen"; cat $d/upstream-server.log; return 1; }
}

our_client_cfg() { # our_client_cfg DIR IDENTITY KEYFILE -> $DIR/ours.yaml
  local d=$1 id=$2 key=$3
  cat > $d/ours.yaml <<EOF
path: "$d/disk.raw"
socket: "$d/vhost.sock"
image_url: "ubiblk://127.0.0.1:$UP_PORT"
psk_identity: "$id"
psk_file: "$key"
metadata_path: "$d/disk.meta"
control_socket: "$d/ctl.sock"
autofetch: true
fetch_connections: 4
EOF
}

our_hydrate() { # our_hydrate DIR TIMEOUT_S -> 0 when `status` says complete
  local d=$1 to=$2
  start ourb $d/ours-backend.log env RUST_LOG=info $OURS_BIN/vhost-backend -f $d/ours.yaml
  local st=""
  for i in $(seq 1 $((to * 5))); do
    sleep 0.2
    [ -S $d/ctl.sock ] || continue
    st=$($T/ctl.py $d/ctl.sock status 2>/dev/null) || continue
    echo "$st" > $d/status.json
    if echo "$st" | grep -q '"complete":true'; then stop ourb; return 0; fi
    kill -0 $PID_ourb 2>/dev/null || break
  done
  stop ourb; return 1
}

up_hydrate() { # up_hydrate DIR TIMEOUT_S -> 0 when fetched == source in the rpc status
  local d=$1 to=$2 st=""
  start upb $d/upstream-backend.log env RUST_LOG=info $UP_BIN/vhost-backend -f $d/upstream.toml
  for i in $(seq 1 $((to * 5))); do
    sleep 0.2
    [ -S $d/rpc.sock ] || continue
    st=$($T/ctl.py $d/rpc.sock '{"command":"status"}' 2>/dev/null) || continue
    echo "$st" > $d/status.json
    if python3 - "$st" <<'PY'
import json, sys
s = json.loads(sys.argv[1])["status"]["stripes"]
sys.exit(0 if s["fetched"] == s["source"] else 1)
PY
    then stop upb; return 0; fi
    kill -0 $PID_upb 2>/dev/null || break
  done
  stop upb; return 1
}

our_server_cfg() { # our_server_cfg DIR IDENTITY KEYFILE [extra yaml...] -> $DIR/server.yaml
  local d=$1 id=$2 key=$3; shift 3
  {
    echo "path: \"$d/srv-disk.raw\""
    echo "socket: \"$d/srv-vhost.sock\""
    echo "control_socket: \"$d/srv-ctl.sock\""
    echo "stripe_server: {listen: \"127.0.0.1:$OUR_PORT\", psk_identity: \"$id\", psk_file: \"$key\"}"
    for l in "$@"; do echo "$l"; done
  } > $d/server.yaml
}

up_client_cfg() { # up_client_cfg DIR IDENTITY KEYFILE -> $DIR/upstream.toml
  local d=$1 id=$2 key=$3
  cat > $d/upstream.toml <<EOF
[device]
data_path = "$d/disk.raw"
metadata_path = "$d/disk.meta"
vhost_socket = "$d/vhost.sock"
rpc_socket = "$d/rpc.sock"

[stripe_source]
type = "remote"
address = "127.0.0.1:$OUR_PORT"
autofetch = true
connections = 4

[stripe_source.psk]
identity = "$id"
secret.ref = "psk"

$(up_secret psk $key)

$(up_danger)
EOF
}

tests() {
  rm -rf $R; mkdir -p $R; : > $RESULTS
  {
    echo "upstream: $(git -C $W/upstream describe --tags) $(git -C $W/upstream rev-parse HEAD)"
    echo "ours: $(git -C $W/ours rev-parse HEAD 2>/dev/null) binaries $OURS_BIN"
    echo "isa-l_crypto: $(git -C $W/isa-l_crypto describe --tags 2>/dev/null)"
  } | tee -a $RESULTS
  # the PSK (32 bytes) and a wrong one; identities
  printf 'interop-psk-0123456789abcdefghij' > $R/psk.key
  printf 'interop-psk-0123456789abcdefghiX' > $R/wrong.key
  chmod 600 $R/psk.key $R/wrong.key
  # a 64 MiB image, recognizable per 4 KiB block; a 40.5 MiB prefix of it
  python3 $T/gen_image.py $R/img64.raw $((64 * MiB)) 1
  head -c $((81 * MiB / 2)) $R/img64.raw > $R/img40h.raw

  # ---- A1: upstream remote-stripe-server (plain 64 MiB file, no metadata) -> our ubiblk://
  local d=$R/a1; mkdir -p $d
  cp $R/img64.raw $d/srv-data.raw
  { printf '[device]\ndata_path = "%s"\n\n' $d/srv-data.raw; up_danger; } > $d/srv.toml
  up_server $d $d/srv.toml $ID $R/psk.key
  truncate -s $((64 * MiB)) $d/disk.raw
  our_client_cfg $d $ID $R/psk.key
  if $OURS_BIN/init-metadata -f $d/ours.yaml > $d/init.log 2>&1; then
    if our_hydrate $d 120; then
      result A1 "$(python3 $T/cmp_report.py $d/disk.raw $R/img64.raw $MiB) status=$(cat $d/status.json)"
    else result A1 "FAIL not complete: $(cat $d/status.json 2>/dev/null) log: $(tail -5 $d/ours-backend.log)"; fi
  else result A1 "FAIL our init-metadata: $(cat $d/init.log)"; fi
  # C1/C2: wrong key / wrong identity, our client -> upstream server
  our_client_cfg $d $ID $R/wrong.key; cp $d/ours.yaml $d/ours-wrongkey.yaml
  sed -i "s#disk.meta#c1.meta#" $d/ours-wrongkey.yaml
  $OURS_BIN/init-metadata -f $d/ours-wrongkey.yaml > $d/c1.log 2>&1; rc=$?
  result C1 "our init-metadata, wrong key -> upstream server: rc=$rc $(tr '\n' ' ' < $d/c1.log)"
  # (same length as the right one: upstream's server panics on one of another length, see C6)
  our_client_cfg $d interop-XX $R/psk.key; cp $d/ours.yaml $d/ours-wrongid.yaml
  sed -i "s#disk.meta#c2.meta#" $d/ours-wrongid.yaml
  $OURS_BIN/init-metadata -f $d/ours-wrongid.yaml > $d/c2.log 2>&1; rc=$?
  result C2 "our init-metadata, wrong identity (same length) -> upstream server: rc=$rc $(tr '\n' ' ' < $d/c2.log) server alive: $(kill -0 $PID_upsrv 2>/dev/null && echo yes || echo NO)"
  # C5: our backend with good metadata but a wrong key at run time
  our_client_cfg $d $ID $R/wrong.key
  sed -i 's#disk.raw#disk-c5.raw#; s#ctl.sock#ctl-c5.sock#' $d/ours.yaml
  cp $d/disk.meta $d/disk-c5.meta 2>/dev/null; sed -i 's#disk.meta#disk-c5.meta#' $d/ours.yaml
  truncate -s $((64 * MiB)) $d/disk-c5.raw
  cp $d/disk.meta.source $d/disk-c5.meta.source 2>/dev/null
  start ourc5 $d/c5-backend.log env RUST_LOG=info $OURS_BIN/vhost-backend -f $d/ours.yaml
  for i in $(seq 1 50); do kill -0 $PID_ourc5 2>/dev/null || break; sleep 0.2; done
  if kill -0 $PID_ourc5 2>/dev/null; then st="still running after 10 s: $($T/ctl.py $d/ctl-c5.sock status 2>&1)"; stop ourc5
  else wait $PID_ourc5; st="exited rc=$?"; fi
  result C5 "our vhost-backend (metadata ok, wrong key at run time) -> upstream server: $st log: $(grep -iE 'error|warn|refus|handshake|tls' $d/c5-backend.log | head -3 | tr '\n' ' ')"
  grep -iE 'error|alert|psk|handshake' $d/upstream-server.log | sort | uniq -c | sort -rn | head -5 > $d/server-refusals.txt
  # byte-level probe of upstream's server: HELLO, METADATA, READ_STRIPE 64 (out of range), opcode 0x7f, READ_STRIPE 63
  $T/probe.sh 127.0.0.1:$UP_PORT $ID $R/psk.key 02 $R/probe-up-hello.bin
  $T/probe.sh 127.0.0.1:$UP_PORT $ID $R/wrong.key 02 $R/probe-up-wrongkey.bin
  $T/probe.sh 127.0.0.1:$UP_PORT $ID $R/psk.key 00 $R/probe-up-meta.bin
  $T/probe.sh 127.0.0.1:$UP_PORT $ID $R/psk.key 014000000000000000 $R/probe-up-oob.bin
  $T/probe.sh 127.0.0.1:$UP_PORT $ID $R/psk.key 7f $R/probe-up-badop.bin
  # C6: a wrong identity of another length: upstream's own client (init-metadata) and ours
  up_client_cfg $d wrong-id $R/psk.key; sed -i "s#disk.meta#c6.meta#; s#:$OUR_PORT#:$UP_PORT#" $d/upstream.toml
  $UP_BIN/init-metadata -f $d/upstream.toml > $d/c6.log 2>&1; rc=$?; sleep 0.5
  result C6a "upstream init-metadata, identity 'wrong-id' (8 bytes, server's is 10) -> upstream server: rc=$rc $(grep -v '^ *$' $d/c6.log | head -3 | tr '\n' ' ') server alive: $(kill -0 $PID_upsrv 2>/dev/null && echo yes || echo "NO: $(grep -A1 panicked $d/upstream-server.log | head -2 | tr '\n' ' ') $(tail -1 $d/upstream-server.log)")"
  stop upsrv; up_server $d $d/srv.toml $ID $R/psk.key
  our_client_cfg $d wrong-id $R/psk.key; sed -i "s#disk.meta#c6b.meta#" $d/ours.yaml
  $OURS_BIN/init-metadata -f $d/ours.yaml > $d/c6b.log 2>&1; rc=$?; sleep 0.5
  result C6b "our init-metadata, identity 'wrong-id' (8 bytes) -> upstream server: rc=$rc $(tr '\n' ' ' < $d/c6b.log) server alive: $(kill -0 $PID_upsrv 2>/dev/null && echo yes || echo NO)"
  stop upsrv

  # ---- A2: upstream server serving a lazy disk: raw source (40.5 MiB image), stripes 0..9
  # fetched (on the data device), 10..40 unfetched (served from the source), 50 written (no
  # source), the rest no data; the data device elsewhere holds 0xEE garbage that must not show.
  d=$R/a2; mkdir -p $d
  python3 -c "open('$d/srv-data.raw','wb').write(b'\xee'*($((64 * MiB))))"
  dd if=$R/img64.raw of=$d/srv-data.raw bs=1M count=10 conv=notrunc status=none
  python3 $T/gen_image.py $d/written50.raw $MiB 50
  dd if=$d/written50.raw of=$d/srv-data.raw bs=1M seek=50 conv=notrunc status=none
  cat > $d/srv.toml <<EOF
[device]
data_path = "$d/srv-data.raw"
metadata_path = "$d/srv.meta"
track_written = true

[stripe_source]
type = "raw"
image_path = "$R/img40h.raw"

$(up_danger)
EOF
  $UP_BIN/init-metadata -f $d/srv.toml > $d/up-init.log 2>&1 || echo "upstream init-metadata failed: $(cat $d/up-init.log)"
  python3 $T/meta.py set $d/srv.meta $(for i in $(seq 0 9); do echo -n "$i=5 "; done) 50=2
  python3 $T/meta.py show $d/srv.meta > $d/srv.meta.txt
  # expected: image 0..40.5 MiB, zeros, stripe 50 = written50, zeros
  python3 - <<EOF
img = open('$R/img40h.raw','rb').read()
e = bytearray(img) + bytearray($((64 * MiB)) - len(img))
e[50 << 20:51 << 20] = open('$d/written50.raw','rb').read()
open('$d/expected.raw','wb').write(e)
EOF
  up_server $d $d/srv.toml $ID $R/psk.key
  # A2: base disk pre-filled with 0xA5 garbage (the no-data stripes must read as zeros)
  python3 -c "open('$d/disk.raw','wb').write(b'\xa5'*($((64 * MiB))))"
  our_client_cfg $d $ID $R/psk.key
  if $OURS_BIN/init-metadata -f $d/ours.yaml > $d/init.log 2>&1; then
    if our_hydrate $d 120; then
      result A2 "base file: $(python3 $T/cmp_report.py $d/disk.raw $d/expected.raw $MiB | tail -3 | tr '\n' ' ') status=$(cat $d/status.json) server metadata: $(cat $d/srv.meta.txt)"
    else result A2 "FAIL not complete: $(cat $d/status.json 2>/dev/null) log: $(tail -5 $d/ours-backend.log)"; fi
  else result A2 "FAIL our init-metadata: $(cat $d/init.log)"; fi
  $T/probe.sh 127.0.0.1:$UP_PORT $ID $R/psk.key 013300000000000000 $R/probe-up-nodata.bin   # stripe 51: no data
  $T/probe.sh 127.0.0.1:$UP_PORT $ID $R/psk.key 00 $R/probe-up-meta-lazy.bin
  stop upsrv

  # ---- B1: our vhost-backend stripe_server (plain 64 MiB disk) -> upstream type=remote source
  d=$R/b1; mkdir -p $d
  cp $R/img64.raw $d/srv-disk.raw
  our_server_cfg $d $ID $R/psk.key
  start oursrv $d/ours-server.log env RUST_LOG=info $OURS_BIN/vhost-backend -f $d/server.yaml
  wait_port $OUR_PORT || echo "our server did not listen: $(cat $d/ours-server.log)"
  truncate -s $((64 * MiB)) $d/disk.raw
  up_client_cfg $d $ID $R/psk.key
  if $UP_BIN/init-metadata -f $d/upstream.toml > $d/init.log 2>&1; then
    python3 $T/meta.py show $d/disk.meta > $d/disk.meta.txt
    if up_hydrate $d 120; then
      result B1 "$(python3 $T/cmp_report.py $d/disk.raw $R/img64.raw $MiB | tail -3 | tr '\n' ' ') status=$(cat $d/status.json) move-status=$($T/ctl.py $d/srv-ctl.sock move-status)"
    else result B1 "FAIL not complete: $(cat $d/status.json 2>/dev/null) log: $(grep -iE 'error|warn' $d/upstream-backend.log | tail -5)"; fi
  else result B1 "FAIL upstream init-metadata: $(cat $d/init.log)"; fi
  # C3/C4: wrong key / identity, upstream client -> our server
  up_client_cfg $d $ID $R/wrong.key; sed -i 's#disk.meta#c3.meta#' $d/upstream.toml
  $UP_BIN/init-metadata -f $d/upstream.toml > $d/c3.log 2>&1; rc=$?
  result C3 "upstream init-metadata, wrong key -> our server: rc=$rc $(tr '\n' ' ' < $d/c3.log)"
  up_client_cfg $d wrong-id $R/psk.key; sed -i 's#disk.meta#c4.meta#' $d/upstream.toml
  $UP_BIN/init-metadata -f $d/upstream.toml > $d/c4.log 2>&1; rc=$?
  result C4 "upstream init-metadata, wrong identity -> our server: rc=$rc $(tr '\n' ' ' < $d/c4.log)"
  $T/probe.sh 127.0.0.1:$OUR_PORT $ID $R/psk.key 02 $R/probe-our-hello.bin
  $T/probe.sh 127.0.0.1:$OUR_PORT $ID $R/psk.key 00 $R/probe-our-meta.bin
  $T/probe.sh 127.0.0.1:$OUR_PORT $ID $R/psk.key 014000000000000000 $R/probe-our-oob.bin
  $T/probe.sh 127.0.0.1:$OUR_PORT $ID $R/psk.key 7f $R/probe-our-badop.bin
  $T/probe.sh 127.0.0.1:$OUR_PORT $ID $R/wrong.key 02 $R/probe-our-wrongkey.bin
  $T/ctl.py $d/srv-ctl.sock move-end > $d/move-end.txt
  stop oursrv
  result C-log "our server log on refused handshakes: $(grep -iE 'handshake|psk|identity|tls|refus' $d/ours-server.log | head -4 | tr '\n' ' ')"

  # ---- B2: our lazy disk (image_path = 40.5 MiB image, metadata by our init-metadata,
  # autofetch limited so some stripes are fetched and some not while serving) -> upstream
  d=$R/b2; mkdir -p $d
  truncate -s $((64 * MiB)) $d/srv-disk.raw
  our_server_cfg $d $ID $R/psk.key "image_path: \"$R/img40h.raw\"" "metadata_path: \"$d/srv.meta\"" \
    "autofetch: true" "autofetch_mib_per_sec: 2"
  $OURS_BIN/init-metadata -f $d/server.yaml > $d/srv-init.log 2>&1 || echo "our init-metadata (server) failed: $(cat $d/srv-init.log)"
  start oursrv $d/ours-server.log env RUST_LOG=info $OURS_BIN/vhost-backend -f $d/server.yaml
  wait_port $OUR_PORT || echo "our server did not listen: $(cat $d/ours-server.log)"
  sleep 2
  $T/probe.sh 127.0.0.1:$OUR_PORT $ID $R/psk.key 00 $R/probe-our-meta-lazy.bin
  truncate -s $((64 * MiB)) $d/disk.raw
  up_client_cfg $d $ID $R/psk.key
  python3 - <<EOF
img = open('$R/img40h.raw','rb').read()
open('$d/expected.raw','wb').write(img + bytes($((64 * MiB)) - len(img)))
EOF
  if $UP_BIN/init-metadata -f $d/upstream.toml > $d/init.log 2>&1; then
    python3 $T/meta.py show $d/disk.meta > $d/disk.meta.txt
    if up_hydrate $d 120; then
      result B2 "$(python3 $T/cmp_report.py $d/disk.raw $d/expected.raw $MiB | tail -3 | tr '\n' ' ') status=$(cat $d/status.json) client metadata: $(cat $d/disk.meta.txt) server status: $($T/ctl.py $d/srv-ctl.sock status)"
    else result B2 "FAIL not complete: $(cat $d/status.json 2>/dev/null) log: $(grep -iE 'error|warn' $d/upstream-backend.log | tail -5)"; fi
  else result B2 "FAIL upstream init-metadata: $(cat $d/init.log)"; fi
  stop oursrv

  # ---- A3: upstream's own encrypted disk (XTS, 128 KiB stripes: -s 8), hydrated by upstream's
  # vhost-backend from a raw image (autofetch, no VMM), then served by remote-stripe-server
  # (decrypted) -> our ubiblk:// client (our disk unencrypted)
  d=$R/a3; mkdir -p $d
  head -c 64 /dev/urandom > $d/xts.key
  truncate -s $((64 * MiB)) $d/srv-data.raw
  cat > $d/upstream.toml <<EOF
[device]
data_path = "$d/srv-data.raw"
metadata_path = "$d/srv.meta"
vhost_socket = "$d/srv-vhost.sock"
rpc_socket = "$d/rpc.sock"
track_written = true

[encryption]
xts_key.ref = "xts"

$(up_secret xts $d/xts.key)

[stripe_source]
type = "raw"
image_path = "$R/img40h.raw"
autofetch = true

$(up_danger)
EOF
  python3 -c "img = open('$R/img40h.raw','rb').read(); open('$R/expected40h.raw','wb').write(img + bytes($((64 * MiB)) - len(img)))"
  if $UP_BIN/init-metadata -s 8 -f $d/upstream.toml > $d/up-init.log 2>&1 && up_hydrate $d 120; then
    $UP_BIN/dump-metadata -f $d/upstream.toml 2>&1 | grep -E 'stripe size|stripes:' | tr '\n' ';' > $d/srv.meta.txt
    enc=$(cmp -s <(head -c 1048576 $d/srv-data.raw) <(head -c 1048576 $R/img64.raw) && echo "PLAINTEXT?!" || echo "encrypted (differs from the image)")
    up_server $d $d/upstream.toml $ID $R/psk.key
    truncate -s $((64 * MiB)) $d/disk.raw
    our_client_cfg $d $ID $R/psk.key
    if $OURS_BIN/init-metadata -f $d/ours.yaml > $d/init.log 2>&1; then
      if our_hydrate $d 120; then
        result A3 "$(python3 $T/cmp_report.py $d/disk.raw $R/expected40h.raw $((128 << 10)) | tail -3 | tr '\n' ' ') upstream data file: $enc; upstream metadata: $(cat $d/srv.meta.txt) our status=$(cat $d/status.json)"
      else result A3 "FAIL not complete: $(cat $d/status.json 2>/dev/null) log: $(tail -5 $d/ours-backend.log)"; fi
    else result A3 "FAIL our init-metadata: $(cat $d/init.log)"; fi
    stop upsrv
  else result A3 "FAIL upstream hydration: $(tail -3 $d/up-init.log) $(cat $d/status.json 2>/dev/null) $(grep -iE 'error' $d/upstream-backend.log | tail -3)"; fi

  # ---- B3: our encrypted lazy disk (128 KiB stripes: init-metadata -s 8, image_path, autofetch
  # limited so fetched-and-encrypted and unfetched stripes are both served) -> upstream client
  d=$R/b3; mkdir -p $d
  truncate -s $((64 * MiB)) $d/srv-disk.raw
  k1=$(head -c 32 /dev/urandom | base64 -w0); k2=$(head -c 32 /dev/urandom | base64 -w0)
  our_server_cfg $d $ID $R/psk.key "image_path: \"$R/img40h.raw\"" "metadata_path: \"$d/srv.meta\"" \
    "autofetch: true" "autofetch_mib_per_sec: 4" "encryption_key: [\"$k1\", \"$k2\"]"
  $OURS_BIN/init-metadata -s 8 -f $d/server.yaml > $d/srv-init.log 2>&1 || echo "our init-metadata (server) failed: $(cat $d/srv-init.log)"
  start oursrv $d/ours-server.log env RUST_LOG=info $OURS_BIN/vhost-backend -f $d/server.yaml
  wait_port $OUR_PORT || echo "our server did not listen: $(cat $d/ours-server.log)"
  sleep 3
  truncate -s $((64 * MiB)) $d/disk.raw
  up_client_cfg $d $ID $R/psk.key
  $UP_BIN/init-metadata -f $d/upstream.toml > $d/init-s11.log 2>&1; rc=$?
  result B3-s11 "upstream init-metadata with its default -s 11 against our 128 KiB-stripe server: rc=$rc $(grep -v '^ *$' $d/init-s11.log | tr '\n' ' ' | cut -c1-400)"
  rm -f $d/disk.meta
  srvst=$($T/ctl.py $d/srv-ctl.sock status)
  if $UP_BIN/init-metadata -s 8 -f $d/upstream.toml > $d/init.log 2>&1; then
    python3 $T/meta.py show $d/disk.meta > $d/disk.meta.txt
    if up_hydrate $d 120; then
      result B3 "$(python3 $T/cmp_report.py $d/disk.raw $R/expected40h.raw $((128 << 10)) | tail -3 | tr '\n' ' ') status=$(cat $d/status.json) client metadata: $(cat $d/disk.meta.txt) server status before: $srvst"
    else result B3 "FAIL not complete: $(cat $d/status.json 2>/dev/null) log: $(grep -iE 'error|warn' $d/upstream-backend.log | tail -5)"; fi
  else result B3 "FAIL upstream init-metadata -s 8: $(cat $d/init.log)"; fi
  stop oursrv

  # ---- D1: our server while a VM's rings run on it (our frontend, stopped with SIGSTOP mid-copy)
  # -> upstream client; then the VM goes away. Ours answers READ_STRIPE 0xFF meanwhile.
  d=$R/d1; mkdir -p $d
  cp $R/img64.raw $d/srv-disk.raw
  our_server_cfg $d $ID $R/psk.key
  start oursrv $d/ours-server.log env RUST_LOG=info $OURS_BIN/vhost-backend -f $d/server.yaml
  wait_port $OUR_PORT || echo "our server did not listen: $(cat $d/ours-server.log)"
  start vm $d/frontend.log $OURS_BIN/vhost-frontend -s $d/srv-vhost.sock -o $d/frontend.out --depth 1 --request-size 512 --timeout 120
  sleep 1; kill -STOP $PID_vm
  ms1=$($T/ctl.py $d/srv-ctl.sock move-status)
  truncate -s $((64 * MiB)) $d/disk.raw
  up_client_cfg $d $ID $R/psk.key
  $UP_BIN/init-metadata -f $d/upstream.toml > $d/init.log 2>&1; irc=$?
  start upb $d/upstream-backend.log env RUST_LOG=info $UP_BIN/vhost-backend -f $d/upstream.toml
  sleep 10; st1=$($T/ctl.py $d/rpc.sock '{"command":"status"}' 2>&1)
  kill -CONT $PID_vm; stop vm
  sleep 2; ms2=$($T/ctl.py $d/srv-ctl.sock move-status)
  sleep 15; st2=$($T/ctl.py $d/rpc.sock '{"command":"status"}' 2>&1)
  stop upb
  result D1 "VM rings running on our server: move-status=$ms1; upstream init-metadata rc=$irc; upstream status after 10 s=$st1; upstream errors: $(grep -E 'ERROR' $d/upstream-backend.log | sed 's/stripe [0-9]*/stripe N/' | sort | uniq -c | head -3 | tr '\n' ' '); after the VM left: move-status=$ms2, upstream status 15 s later=$st2; our server log: $(grep -iE 'refused' $d/ours-server.log | head -2 | tr '\n' ' ')"
  if up_hydrate $d 60; then
    result D1b "upstream vhost-backend restarted after the VM left: $(python3 $T/cmp_report.py $d/disk.raw $R/img64.raw $MiB | tail -1) status=$(cat $d/status.json)"
  else result D1b "upstream vhost-backend restarted after the VM left: FAIL not complete: $(cat $d/status.json 2>/dev/null)"; fi
  stop oursrv

  # ---- D2: upstream's server closes a connection idle longer than its
  # operation_attempt_timeout_ms (default 20 s; here 300 ms); our client keeps idle connections
  # pooled (autofetch limited to 2 MiB/s, so every pooled connection idles past it)
  d=$R/d2; mkdir -p $d
  head -c $((16 * MiB)) $R/img64.raw > $d/srv-data.raw
  { printf '[device]\ndata_path = "%s"\n\n' $d/srv-data.raw; up_danger; } > $d/srv.toml
  up_server $d $d/srv.toml $ID $R/psk.key
  sed -i 's/^address = .*/&\noperation_attempt_timeout_ms = 300/' $d/listen.toml
  stop upsrv; start upsrv $d/upstream-server.log env RUST_LOG=info $UP_BIN/remote-stripe-server --config $d/srv.toml --listen-config $d/listen.toml
  wait_port $UP_PORT
  truncate -s $((16 * MiB)) $d/disk.raw
  our_client_cfg $d $ID $R/psk.key
  echo "autofetch_mib_per_sec: 2" >> $d/ours.yaml
  sed -i 's/^fetch_connections: .*/fetch_connections: 2/' $d/ours.yaml
  if $OURS_BIN/init-metadata -f $d/ours.yaml > $d/init.log 2>&1 && our_hydrate $d 60; then
    result D2 "$(python3 $T/cmp_report.py $d/disk.raw $d/srv-data.raw $MiB | tail -1) status=$(cat $d/status.json); upstream closed idle sessions: $(grep -c 'Closing idle connection' $d/upstream-server.log); our log warnings: $(grep -c WARN $d/ours-backend.log) e.g. $(grep WARN $d/ours-backend.log | head -2 | tr '\n' ' ')"
  else result D2 "FAIL: $(cat $d/init.log) $(cat $d/status.json 2>/dev/null) $(grep WARN $d/ours-backend.log | head -3 | tr '\n' ' ')"; fi
  stop upsrv

  # ---- E1: upstream's remote-stripe-shell against our server (plain 64 MiB disk)
  d=$R/e1; mkdir -p $d
  cp $R/img64.raw $d/srv-disk.raw
  our_server_cfg $d $ID $R/psk.key
  start oursrv $d/ours-server.log env RUST_LOG=info $OURS_BIN/vhost-backend -f $d/server.yaml
  wait_port $OUR_PORT
  printf '[server]\naddress = "127.0.0.1:%s"\n\n[server.psk]\nidentity = "%s"\nsecret.ref = "psk"\n\n%s\n\n[danger_zone]\nenabled = true\nallow_secret_over_regular_file = true\n' \
    $OUR_PORT $ID "$(up_secret psk $R/psk.key)" > $d/shell.toml
  printf 'stripe_header 0\nfetch_stripe 3\ndump_stripe 3 0 32\nstripe_header 64\nexit\n' |
    timeout 20 $UP_BIN/remote-stripe-shell --server-config $d/shell.toml > $d/shell.out 2>&1
  want=$(dd if=$R/img64.raw bs=1 skip=$((3 * MiB)) count=32 status=none | xxd -p -c 64)
  result E1 "upstream remote-stripe-shell -> our server: $(tr '\n' '|' < $d/shell.out) expected dump: $want $(grep -q "$want" $d/shell.out && echo MATCH || echo MISMATCH)"
  stop oursrv

  # ---- byte-level comparison of the two servers' answers
  for p in hello oob badop wrongkey; do
    result "P-$p" "upstream=$(xxd -p $R/probe-up-$p.bin | tr -d '\n') ours=$(xxd -p $R/probe-our-$p.bin | tr -d '\n') tls: up[$(tr '\n' ' ' < $R/probe-up-$p.bin.tls)] ours[$(tr '\n' ' ' < $R/probe-our-$p.bin.tls)]"
  done
  result P-meta "upstream(plain 64MiB)=$(head -c 600 $R/probe-up-meta.bin | xxd -p | tr -d '\n' | cut -c1-80).. ($(stat -c %s $R/probe-up-meta.bin) bytes) ours(plain 64MiB)=$(head -c 600 $R/probe-our-meta.bin | xxd -p | tr -d '\n' | cut -c1-80).. ($(stat -c %s $R/probe-our-meta.bin) bytes) identical=$(cmp -s $R/probe-up-meta.bin $R/probe-our-meta.bin && echo yes || echo no)"
  for f in probe-up-meta probe-our-meta probe-up-meta-lazy probe-our-meta-lazy; do
    tail -c +10 $R/$f.bin > $R/$f.blob
    result "P-decode $f" "status+size=$(head -c 9 $R/$f.bin | xxd -p) $(python3 $T/meta.py show $R/$f.blob)"
  done
  result P-nodata "upstream READ_STRIPE(51, no data)=$(xxd -p $R/probe-up-nodata.bin)"
  echo "done; results in $RESULTS"
}

case "${1:-all}" in
  build) build ;;
  test) tests ;;
  all) build && tests ;;
  *) echo "usage: $0 [build|test|all]"; exit 2 ;;
esac
