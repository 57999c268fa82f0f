# A multi-stage build: the toolchain stays in the first stage, the image is
# the binary alone on a distroless base, running as a non-root user.
#
#   docker build -t kongtie-gateway .
#   docker run --env-file deploy/kongtie-gateway.env.example \
#     -p 50051:50051 -p 8080:8080 -p 127.0.0.1:9090:9090 \
#     -v kongtie-data:/data kongtie-gateway

FROM rust:1.95-bookworm AS build
WORKDIR /src
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
