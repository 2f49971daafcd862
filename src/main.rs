fn main() {
    std::process::exit(deepcut_fast::cli::main());
}
