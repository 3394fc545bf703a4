package cape.errors;

/**
 * Base class of every error the Cape SDK reports (mirrors {@code cape.errors.CapeError}).
 *
 * <p>Bugs in the SDK itself raise {@link IllegalArgumentException} or {@link IllegalStateException}
 * instead. Messages never contain keys, tokens or plaintext.
 */
public class CapeException extends RuntimeException {
    private static final long serialVersionUID = 1L;

    public CapeException(String message) {
        super(message);
    }
}
