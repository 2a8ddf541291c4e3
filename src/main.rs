fn main() {
    std::process::exit(homelab_matrix::cli::main());
}
