# Builds all storegate binaries (auth-service, product-service, storegate)
# into one small runtime image; docker-compose.yml picks the binary.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin auth-service --bin product-service --bin storegate

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/storegate --create-home storegate
COPY --from=build /src/target/release/auth-service /src/target/release/product-service /src/target/release/storegate /usr/local/bin/
USER storegate
WORKDIR /var/lib/storegate
ENV LOG_FORMAT=json
# Metrics (9101, 9102) listen on the container's loopback unless
# METRICS_LISTEN_ADDR says otherwise: not exposed.
EXPOSE 50051 50052
CMD ["storegate", "up"]
