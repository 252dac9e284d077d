#!/usr/bin/env bash
# Make the certificates and token keys steve-jobs needs (openssl, ECDSA P-256).
#
#   gen_certs.sh [--dir DIR] [--force] [--san NAME]... [USER:ROLE]...
#       A new set: a CA, a server certificate (SANs localhost, 127.0.0.1, ::1 and each
#       --san), a client certificate and a 30-day token for each USER:ROLE (default
#       mrarsenal:admin alice:user), and the ES256 token signing key pair.
#       Refuses to overwrite an existing set without --force.
#   gen_certs.sh [--dir DIR] --add-user USER[:ROLE]
#       One more client certificate (and token) from the existing CA.
#   gen_certs.sh [--dir DIR] --development ...
#       Mark the CA as the DEVELOPMENT CA (the server warns when it runs on it) and give
#       tokens a 2-year life. Only for the set bundled in certs/.
#
# Roles: admin (all jobs, root jobs, up to the server's maximum limits), user (own jobs,
# unprivileged, within the server's default limits), reader (reads every job).
# Private keys are written mode 0600 and never printed. The token signing private key
# (jwt-signing.key) and the CA key belong to the operator, not on the job server.
set -euo pipefail
umask 077

dir="$(cd "$(dirname "$0")" && pwd)/certs"
force=0; add_user=""; dev=0; sans=(); users=()
die() { echo "gen_certs.sh: $*" >&2; exit 2; }
value() { [ $# -ge 2 ] || die "$1 needs a value"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --dir) value "$@"; dir="$2"; shift 2 ;;
        --force) force=1; shift ;;
        --san) value "$@"; sans+=("$2"); shift 2 ;;
        --add-user) value "$@"; add_user="$2"; shift 2 ;;
        --development) dev=1; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        -*) echo "gen_certs.sh: unknown option $1" >&2; exit 2 ;;
        *) users+=("$1"); shift ;;
    esac
done
[ ${#users[@]} -gt 0 ] || users=("mrarsenal:admin" "alice:user")

# Every argument is checked before anything is written: a bad one leaves no half-made set.
# A user name becomes a certificate subject and file names; a SAN goes into an openssl
# config file, where a newline or comma would add extensions of the caller's choosing.
check_user() {   # USER[:ROLE]
    local user="${1%%:*}" role="${1#*:}"
    [ "$role" = "$1" ] && role=user
    case "$user" in ""|-*|*[!A-Za-z0-9._-]*) die "bad user name $(printf %q "$user") (letters, digits, . _ -)" ;; esac
    case "$role" in admin|user|reader) ;; *) die "bad role $(printf %q "$role") (admin, user or reader)" ;; esac
}
check_san() {
    [[ "$1" =~ ^[A-Za-z0-9*]([A-Za-z0-9.*-]*[A-Za-z0-9])?$ || "$1" =~ ^[0-9A-Fa-f:.]+$ ]] ||
        die "bad --san $(printf %q "$1") (a DNS name or an IP address)"
}
for u in "${users[@]}"; do check_user "$u"; done
[ -z "$add_user" ] || check_user "$add_user"
for s in "${sans[@]+"${sans[@]}"}"; do check_san "$s"; done

ossl() {   # openssl, quiet unless it fails; then its own words
    local log; log="$(mktemp)"
    if ! openssl "$@" 2>"$log"; then
        echo "gen_certs.sh: openssl $1 failed:" >&2; cat "$log" >&2; rm -f "$log"; exit 1
    fi
    rm -f "$log"
}
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x "$here/.venv/bin/python" ]; then python="$here/.venv/bin/python"; else python=python3; fi
fi
token_days=30; [ $dev = 1 ] && token_days=730
cert_days=825

serial() { echo "0x$(openssl rand -hex 16)"; }   # random 128-bit serial
new_key() { ossl ecparam -name prime256v1 -genkey -noout -out "$1"; chmod 600 "$1"; }

make_client() {   # USER ROLE
    local user="$1" role="$2" tmp
    tmp="$(mktemp)"
    printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n' > "$tmp"
    new_key "$dir/$user.key"
    ossl req -new -key "$dir/$user.key" -subj "/O=steve-jobs/CN=$user" -out "$dir/$user.csr"
    ossl x509 -req -in "$dir/$user.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
        -set_serial "$(serial)" -days "$cert_days" -sha256 -extfile "$tmp" -out "$dir/$user.crt"
    rm -f "$dir/$user.csr" "$tmp"
    "$python" "$here/steve_jobs.py" token --for-user "$user" --role "$role" \
        --cert "$dir/$user.crt" --signing-key "$dir/jwt-signing.key" --days "$token_days" > "$dir/$user.jwt"
    chmod 600 "$dir/$user.jwt"
    echo "made $dir/$user.crt, $user.key and $user.jwt (role $role, token for $token_days days)"
}

if [ -n "$add_user" ]; then
    [ -f "$dir/ca.key" ] && [ -f "$dir/jwt-signing.key" ] || {
        echo "gen_certs.sh: no CA in $dir: make a set first" >&2; exit 1; }
    if [ -f "$dir/${add_user%%:*}.crt" ] && [ $force = 0 ]; then
        echo "gen_certs.sh: $dir/${add_user%%:*}.crt exists; use --force to replace it" >&2; exit 1
    fi
    role="${add_user#*:}"; [ "$role" = "$add_user" ] && role=user
    make_client "${add_user%%:*}" "$role"
    exit 0
fi

if [ -f "$dir/ca.crt" ] && [ $force = 0 ]; then
    echo "gen_certs.sh: $dir already holds a certificate set; use --force to replace it" >&2
    exit 1
fi
mkdir -p "$dir"
rm -f "$dir"/*.crt "$dir"/*.key "$dir"/*.jwt "$dir"/*.pub

ca_name="steve-jobs CA"; [ $dev = 1 ] && ca_name="steve-jobs DEVELOPMENT CA"
tmp="$(mktemp)"
printf '[req]\ndistinguished_name=dn\nx509_extensions=v3_ca\nprompt=no\n[dn]\nO=steve-jobs\nCN=%s\n[v3_ca]\nbasicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n' "$ca_name" > "$tmp"
new_key "$dir/ca.key"
ossl req -new -x509 -key "$dir/ca.key" -config "$tmp" -set_serial "$(serial)" \
    -days 3650 -sha256 -out "$dir/ca.crt"
rm -f "$tmp"

san="DNS:localhost,IP:127.0.0.1,IP:::1"
for s in "${sans[@]+"${sans[@]}"}"; do
    if [[ "$s" =~ ^[0-9.]+$ || "$s" == *:* ]]; then san="$san,IP:$s"; else san="$san,DNS:$s"; fi
done
tmp="$(mktemp)"
printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=%s\n' "$san" > "$tmp"
new_key "$dir/server.key"
ossl req -new -key "$dir/server.key" -subj "/O=steve-jobs/CN=steve-jobs server" -out "$dir/server.csr"
ossl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
    -set_serial "$(serial)" -days "$cert_days" -sha256 -extfile "$tmp" -out "$dir/server.crt"
rm -f "$dir/server.csr" "$tmp"

new_key "$dir/jwt-signing.key"
ossl ec -in "$dir/jwt-signing.key" -pubout -out "$dir/jwt-signing.pub"
chmod 644 "$dir/jwt-signing.pub" "$dir/ca.crt" "$dir/server.crt"
echo "made $dir/ca.crt, server.crt (SAN $san) and the token signing key pair"

for u in "${users[@]}"; do
    role="${u#*:}"; [ "$role" = "$u" ] && role=user
    make_client "${u%%:*}" "$role"
done
chmod 644 "$dir"/*.crt
