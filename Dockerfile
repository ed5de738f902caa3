# syntax=docker/dockerfile:1
# The actio image: the binary at /usr/local/bin/actio (the entrypoint), the shipped
# pipelines at /etc/actio/pipelines/<name>/, running as an unprivileged user.
#
#   docker build -t actio:dev .
#   docker run --rm actio:dev validate /etc/actio/pipelines/fraud
#   docker run --rm -p 9400:9400 -e ACTIO_KAFKA_BROKERS=kafka:9092 \
#       actio:dev stage --pipeline /etc/actio/pipelines/fraud --stage rules
#
# On Kubernetes (k8s/) the pipeline directory is mounted over from a ConfigMap built
# from pipelines/<name>/, so a pipeline change needs no new image.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
# librdkafka is built from source by rdkafka-sys with CMake; its bundled curl links
# OpenSSL (libssl-dev and pkg-config come with the rust image, zlib too).
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target/ between builds (BuildKit); the binary
# is copied out of the cached target/ so the next stage can take it.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p actio \
    && install -m 0755 target/release/actio /usr/local/bin/actio

FROM debian:bookworm-slim
# libssl3: the OpenSSL the bundled curl links; ca-certificates: TLS to brokers.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 actio \
    && useradd --system --uid 10001 --gid actio --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin actio
COPY --from=build /usr/local/bin/actio /usr/local/bin/actio
COPY pipelines/ /etc/actio/pipelines/
# Numeric, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 10001:10001
# /metrics, /healthz, /readyz of `actio stage`.
EXPOSE 9400
ENTRYPOINT ["/usr/local/bin/actio"]
CMD ["--help"]
