package cape.errors;

/**
 * The document's leaf certificate is not valid at the check time.
 */
public class CertificateExpiredException extends ChainException {
    private static final long serialVersionUID = 1L;

    public CertificateExpiredException(String message) {
        super(message);
    }
}
