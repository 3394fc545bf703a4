package cape.errors;

/**
 * Malformed bytes: a frame, envelope, key, document or bundle that does not parse.
 */
public class FormatException extends CapeException {
    private static final long serialVersionUID = 1L;

    public FormatException(String message) {
        super(message);
    }
}
