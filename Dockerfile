# syntax=docker/dockerfile:1
# The four service images, one target each, from one build of the workspace:
#   docker build --target ingest    -t ghcr.io/tally-dev/tally-ingest:0.1.0 .
#   docker build --target consumer  -t ghcr.io/tally-dev/tally-consumer:0.1.0 .     (also `migrate`, `dlq`)
#   docker build --target query-api -t ghcr.io/tally-dev/tally-query-api:0.1.0 .
#   docker build --target archiver  -t ghcr.io/tally-dev/tally-archiver:0.1.0 .     (`run`, `serve`, …)
# Build stage: the pinned toolchain (rust-toolchain.toml) and the OpenSSL headers librdkafka needs
# for TLS and SASL/SCRAM. Runtime: distroless (glibc, libssl3, CA certificates, no shell) as the
# image's non-root user 65532. Not built on the project's machine (it has no container engine);
# `make k8s-check` scans this file with checkov.
FROM rust:1.95.0-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends libssl-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p tally-ingest -p tally-consumer -p tally-query-api -p tally-archiver \
 && mkdir /out \
 && cp target/release/tally-ingest target/release/tally-consumer target/release/tally-query-api \
       target/release/tally-archiver /out/

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
USER 65532:65532
# Kubernetes probes /healthz and /readyz (k8s/); the image has no shell or curl to run a check.
HEALTHCHECK NONE

FROM runtime AS ingest
COPY --from=build /out/tally-ingest /usr/local/bin/tally-ingest
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/tally-ingest"]

FROM runtime AS consumer
COPY --from=build /out/tally-consumer /usr/local/bin/tally-consumer
EXPOSE 8082
ENTRYPOINT ["/usr/local/bin/tally-consumer"]

FROM runtime AS query-api
COPY --from=build /out/tally-query-api /usr/local/bin/tally-query-api
EXPOSE 8081
ENTRYPOINT ["/usr/local/bin/tally-query-api"]

FROM runtime AS archiver
COPY --from=build /out/tally-archiver /usr/local/bin/tally-archiver
EXPOSE 8083
ENTRYPOINT ["/usr/local/bin/tally-archiver"]
