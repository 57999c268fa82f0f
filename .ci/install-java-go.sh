#!/usr/bin/env bash
# Debian's packages for the Java and Go examples and for proto/generate.sh's
# plugins: OpenJDK 17 with grpc-java 1.41 and its jars (netty, perfmark,
# guava, javax.annotation), protobuf-java and google.rpc's protos; Go 1.19
# with grpc-go 1.33, protobuf-go, genproto and the protobuf 1.5 shim (the
# older golang-github-golang-protobuf package does not build with them);
# protoc with the Go, Java and PHP gRPC plugins. About 30 s on a
# machine without them; nothing when they are there.
set -euo pipefail
packages=(
  openjdk-17-jdk-headless libgrpc-java libprotobuf-java libgoogle-common-protos-java
  libnetty-java libperfmark-java libguava-java libgeronimo-annotation-1.3-spec-java
  golang-go golang-google-grpc-dev golang-google-protobuf-dev golang-google-genproto-dev
  golang-github-golang-protobuf-1-5-dev
  protobuf-compiler protobuf-compiler-grpc protobuf-compiler-grpc-java-plugin
  protoc-gen-go protoc-gen-go-grpc
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "apt-get install ${missing[*]}"
  start=$SECONDS
  apt-get install -y -qq "${missing[@]}" >/dev/null \
    || { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; }
  echo "installed in $((SECONDS - start)) s"
fi
java -version 2>&1 | head -1
go version
