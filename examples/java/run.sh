#!/usr/bin/env bash
# Builds the Java example the Debian way (javac against the jars of
# Debian's libgrpc-java, libprotobuf-java, libgoogle-common-protos-java and
# their dependencies in /usr/share/java) and runs it with the given
# arguments. The generated classes come from gen/java (`bash
# proto/generate.sh`). A real project takes the same libraries from Maven
# Central instead: see README.md beside this file.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
[ -d "$root/gen/java/com/kongtie/v1" ] \
  || { echo "no gen/java: run bash proto/generate.sh java first" >&2; exit 1; }

jars=/usr/share/java
classpath=""
for jar in grpc-api grpc-context grpc-core grpc-netty grpc-protobuf grpc-protobuf-lite grpc-stub \
  protobuf proto-google-common-protos guava perfmark-api geronimo-annotation-1.3-spec \
  netty-buffer netty-codec netty-codec-http netty-codec-http2 netty-codec-socks netty-common \
  netty-handler netty-handler-proxy netty-resolver netty-transport; do
  [ -f "$jars/$jar.jar" ] || { echo "missing $jars/$jar.jar (see examples/java/README.md)" >&2; exit 1; }
  classpath="$classpath:$jars/$jar.jar"
done
classpath=${classpath#:}

build="$here/build"
rm -rf "$build" && mkdir -p "$build/classes"
find "$root/gen/java" "$here/src/main/java" -name '*.java' >"$build/sources"
javac -nowarn -encoding UTF-8 --release 17 -cp "$classpath" -d "$build/classes" @"$build/sources"
exec java -cp "$build/classes:$classpath" com.kongtie.examples.Client "$@"
