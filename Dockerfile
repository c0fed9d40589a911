# The flotilla binary in a small image. Used by docker-compose.yml.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p flotilla-cli

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 flotilla
COPY --from=build /src/target/release/flotilla /usr/local/bin/flotilla
COPY config/flotilla.toml /etc/flotilla/flotilla.toml
USER flotilla
ENTRYPOINT ["flotilla", "--config", "/etc/flotilla/flotilla.toml"]
