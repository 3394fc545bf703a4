package cape.errors;

/**
 * A function checksum differs from the one the caller pinned.
 */
public class ChecksumMismatchException extends VerificationException {
    private static final long serialVersionUID = 1L;

    public ChecksumMismatchException(String message) {
        super(message);
    }
}
