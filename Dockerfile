# A multi-stage build: the toolchain stays in the `build` stage; the image
# (the `runtime` stage) is the binary alone on a distroless base, running as
# the non-root user 65532 with /data as a volume. README "Running in
# production" ("Deploying") has the docker/podman commands.
#
#   docker build -t kongtie-gateway .
#
# Both base images are build arguments, for mirrors and air-gapped builds:
#
#   --build-arg RUST_IMAGE=registry.internal/rust:1.95-bookworm
#   --build-arg RUNTIME_IMAGE=registry.internal/debian:bookworm-slim
#
# A binary built elsewhere (e.g. by `cargo build --release --locked` on a
# Debian 12 host) replaces the build stage with a build context of that name
# holding out/kongtie-gateway and an empty out/data/; the runtime stage, the
# image users run, is the same. CI builds its image this way (.ci/image.sh):
#
#   podman build --build-context build=DIR --target runtime -t kongtie-gateway .

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
# The dependencies first, in a layer of their own: it is rebuilt only when
# the manifest, the lock file, the vendored crate, the protos or the
# migrations change, not at every source change. The crate itself is an
# empty stand-in here; its traces are removed so that the real one below is
# always compiled (COPY keeps the context's older timestamps).
COPY Cargo.toml Cargo.lock build.rs ./
COPY vendor vendor
COPY proto proto
COPY migrations migrations
COPY benches benches
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src target/release/kongtie-gateway* \
      target/release/.fingerprint/kongtie-gateway-* \
      target/release/deps/kongtie_gateway-* target/release/deps/libkongtie_gateway-*
COPY . .
RUN cargo build --release --locked \
 && strip target/release/kongtie-gateway \
 && mkdir -p /out/data \
 && cp target/release/kongtie-gateway /out/kongtie-gateway

FROM ${RUNTIME_IMAGE} AS runtime
COPY --from=build /out/kongtie-gateway /usr/local/bin/kongtie-gateway
# The store lives on a volume owned by the image's non-root user; numeric,
# so that any base works (distroless calls 65532 `nonroot`).
COPY --from=build --chown=65532:65532 /out/data /data
ENV KONGTIE_GRPC_ADDR=0.0.0.0:50051 \
    KONGTIE_NOTIFY_ADDR=0.0.0.0:8080 \
    KONGTIE_ADMIN_ADDR=0.0.0.0:9090 \
    KONGTIE_DATA_DIR=/data \
    KONGTIE_LOG_FORMAT=json
VOLUME ["/data"]
EXPOSE 50051 8080 9090
# No HEALTHCHECK: the distroless base has no shell or curl to run one. Probe
# the admin port instead: GET /healthz (alive) and GET /readyz (ready: the
# store writable), as deploy/kubernetes/deployment.yaml does.
USER 65532:65532
# SIGTERM is the graceful stop (README "Shutdown"); give `docker stop -t`
# more than KONGTIE_SHUTDOWN_GRACE_SECS (10).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/kongtie-gateway"]
CMD ["serve"]
