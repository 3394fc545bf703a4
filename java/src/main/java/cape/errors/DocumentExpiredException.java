package cape.errors;

/**
 * The document's timestamp is older than the allowed maximum age.
 */
public class DocumentExpiredException extends VerificationException {
    private static final long serialVersionUID = 1L;

    public DocumentExpiredException(String message) {
        super(message);
    }
}
