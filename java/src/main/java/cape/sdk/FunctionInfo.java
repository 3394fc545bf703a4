package cape.sdk;

/** A deployed function as {@code GET /v1/functions} lists it. */
public record FunctionInfo(String id, String name, String createdAt, String checksum, boolean isPublic) {}
