#!/bin/bash
# probe.sh HOST:PORT IDENTITY KEYFILE REQUEST_HEX OUT
# Sends REQUEST_HEX over TLS 1.2 PSK-AES256-GCM-SHA384 (openssl s_client), writes the server's
# answer bytes to OUT and the handshake summary (-brief) to OUT.tls.
addr=$1 id=$2 keyfile=$3 req=$4 out=$5
keyhex=$(xxd -p -c 256 "$keyfile")
( printf '%s' "$req" | xxd -r -p; sleep 2 ) |
  timeout 15 openssl s_client -connect "$addr" -tls1_2 -cipher 'PSK-AES256-GCM-SHA384' \
    -psk "$keyhex" -psk_identity "$id" -brief > "$out" 2> "$out.tls"
echo "rc=$?" >> "$out.tls"
