fn main() {
    print!("{}", ces_api::crds_yaml());
}
