//! Prints the cluster form of every migration for database DB on cluster CLUSTER
//! (`tally_schemas::cluster`), each statement followed by a NUL byte:
//! `dev/cluster.sh schema` applies them to the local cluster and checks the result.

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(db), cluster) = (args.next(), args.next().unwrap_or_else(|| "tally".into())) else {
        eprintln!("usage: cluster_ddl DB [CLUSTER]");
        std::process::exit(2);
    };
    for migration in tally_schemas::migrations::MIGRATIONS {
        for statement in migration.statements(&db) {
            for clustered in tally_schemas::cluster::for_cluster(&statement, &cluster) {
                print!("{clustered}\0");
            }
        }
    }
}
