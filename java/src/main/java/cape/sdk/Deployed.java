package cape.sdk;

/** A function just deployed: its id, the checksum the enclave measured (hex), its name. */
public record Deployed(String id, String checksum, String name) {}
