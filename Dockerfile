# A multi-stage build: the toolchain stays in the first stage, the image is
# the binary alone on a distroless base, running as a non-root user.
#
#   docker build -t kongtie-gateway .
#   docker run --env-file deploy/kongtie-gateway.env.example \
#     -p 50051:50051 -p 8080:8080 -p 127.0.0.1:9090:9090 \
#     -v kongtie-data:/data kongtie-gateway

FROM rust:1.95-bookworm AS build
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
 && mkdir -p /data

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/kongtie-gateway /usr/local/bin/kongtie-gateway
# The store lives on a volume owned by the image's non-root user (65532).
COPY --from=build --chown=65532:65532 /data /data
ENV KONGTIE_GRPC_ADDR=0.0.0.0:50051 \
    KONGTIE_NOTIFY_ADDR=0.0.0.0:8080 \
    KONGTIE_ADMIN_ADDR=0.0.0.0:9090 \
    KONGTIE_DATA_DIR=/data \
    KONGTIE_LOG_FORMAT=json
VOLUME ["/data"]
EXPOSE 50051 8080 9090
USER nonroot:nonroot
ENTRYPOINT ["/usr/local/bin/kongtie-gateway"]
CMD ["serve"]
