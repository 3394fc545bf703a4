package cape.sdk;

/** A personal access token's metadata (never the token itself). */
public record TokenInfo(
        String id, String name, String description, String createdAt, String expiresAt,
        String lastUsed, String functionId) {}
