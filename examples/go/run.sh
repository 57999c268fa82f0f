#!/usr/bin/env bash
# Builds the Go example the Debian way and runs it with the given
# arguments: GOPATH mode (GO111MODULE=off) over Debian's Go sources in
# /usr/share/gocode (golang-google-grpc-dev, golang-google-protobuf-dev,
# golang-google-genproto-dev, golang-github-golang-protobuf-1-5-dev) and
# this repository's committed gen/go, placed at its import path. A real
# project uses Go modules instead (`go get`): see README.md beside this file.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
[ -d /usr/share/gocode/src/google.golang.org/grpc ] \
  || { echo "no /usr/share/gocode/src/google.golang.org/grpc: see examples/go/README.md" >&2; exit 1; }

gopath="$root/.tools/gopath"
mkdir -p "$gopath/src/github.com/kongtie/kongtie-gateway" "$gopath/bin"
ln -sfn "$root/gen" "$gopath/src/github.com/kongtie/kongtie-gateway/gen"
ln -sfn "$here" "$gopath/src/kongtie-go-example"
(cd "$gopath/src/kongtie-go-example" \
  && GO111MODULE=off GOPATH="$gopath:/usr/share/gocode" GOCACHE="$root/.tools/gocache" GOFLAGS= \
    go build -o "$gopath/bin/kongtie-go-example" .)
exec "$gopath/bin/kongtie-go-example" "$@"
