package cape.errors;

/** A connection, TLS or framing failure; {@link #closeCode()} when the server closed. */
public class TransportException extends CapeException {
    private static final long serialVersionUID = 1L;

    private final Integer closeCode;

    public TransportException(String message) {
        this(message, null);
    }

    public TransportException(String message, Integer closeCode) {
        super(message);
        this.closeCode = closeCode;
    }

    /** The websocket close code, or {@code null} if unknown. */
    public Integer closeCode() {
        return closeCode;
    }
}
