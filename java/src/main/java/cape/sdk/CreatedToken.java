package cape.sdk;

/** A new token: {@link #token()} is shown once; the server keeps only its metadata. */
public record CreatedToken(String id, String token) {
    @Override
    public String toString() {
        return "CreatedToken[id=" + id + ", token=<hidden>]";
    }
}
