//! `auditstream`: the one binary. Each role runs in its own process in
//! production (`producer`, `router`, `deliverer`); `dev` runs everything in
//! one process on an embedded broker; `receiver` is the reference receiver;
//! the rest are admin tools.

mod api_client;
mod destinations;
mod dev;
mod dlq;
mod publish;
mod roles;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

/// Streams audit events from services to the destinations their owners chose.
#[derive(Parser)]
#[command(name = "auditstream", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the producer (HTTP API → Kafka).
    Producer(roles::RoleArgs),
    /// Run the router (events → deliveries).
    Router(roles::RoleArgs),
    /// Run the deliverer (deliveries → destinations).
    Deliverer(roles::RoleArgs),
    /// Run the whole system in one process on an embedded broker.
    Dev(dev::DevArgs),
    /// Run the reference receiver.
    Receiver(roles::ReceiverArgs),
    /// Rewrite every destination with its secrets sealed under the current
    /// key (key rotation: new key first, reseal, then drop the old key).
    Reseal(roles::RoleArgs),
    /// Publish events from a file or standard input.
    Publish(publish::PublishArgs),
    /// Manage destinations through the producer API.
    Destinations {
        #[command(subcommand)]
        command: destinations::Command,
    },
    /// Dead-lettered deliveries: list and replay.
    Dlq {
        #[command(subcommand)]
        command: dlq::DlqCommand,
    },
    /// Configuration of the roles.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Event-type definitions.
    Types {
        #[command(subcommand)]
        command: TypesCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print a role's default configuration as TOML: every key, with its
    /// default value (a starting point for a config file).
    Defaults {
        /// producer, router or deliverer.
        #[arg(value_parser = ["producer", "router", "deliverer"])]
        role: String,
    },
    /// Load a role's configuration (file and environment) and validate it.
    Check {
        /// producer, router or deliverer.
        #[arg(value_parser = ["producer", "router", "deliverer"])]
        role: String,
        #[command(flatten)]
        args: roles::RoleArgs,
    },
}

#[derive(Subcommand)]
enum TypesCommand {
    /// Check a folder of definition files; every error names file and field.
    Validate {
        /// The folder of `<name>.yml` files.
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Producer(args) => roles::producer(args).await,
            Command::Router(args) => roles::router(args).await,
            Command::Deliverer(args) => roles::deliverer(args).await,
            Command::Dev(args) => dev::run(args).await,
            Command::Receiver(args) => roles::receiver(args).await,
            Command::Types { command: TypesCommand::Validate { dir } } => roles::validate_types(&dir),
            Command::Dlq { command } => dlq::run(command).await,
            Command::Publish(args) => publish::run(args).await,
            Command::Reseal(args) => roles::reseal(args).await,
            Command::Destinations { command } => destinations::run(command).await,
            Command::Config { command: ConfigCommand::Defaults { role } } => roles::print_defaults(&role),
            Command::Config { command: ConfigCommand::Check { role, args } } => roles::check_config(&role, &args),
        }
    })
}
