package cape.crypto;

import cape.errors.DecryptionException;
import cape.errors.KeyFormatException;
import cape.errors.MalformedEnvelopeException;
import java.security.GeneralSecurityException;
import java.security.SecureRandom;
import javax.crypto.AEADBadTagException;
import javax.crypto.Cipher;
import javax.crypto.spec.IvParameterSpec;
import javax.crypto.spec.SecretKeySpec;
import org.bouncycastle.crypto.digests.SHA256Digest;
import org.bouncycastle.crypto.generators.HKDFBytesGenerator;
import org.bouncycastle.crypto.params.HKDFParameters;
import org.bouncycastle.crypto.params.X25519PrivateKeyParameters;
import org.bouncycastle.crypto.params.X25519PublicKeyParameters;

/**
 * The sealed-results channel ({@code cape.crypto.results.ResultChannel}, docs/protocol.md
 * "Sealed results"):
 *
 * <pre>
 * shared = X25519(client response key, enclave session key)
 * key    = HKDF-SHA256(shared, salt = none, info = "cape-results-v1" || session pub || response pub)
 * reply n = ChaCha20-Poly1305(key, nonce = n as 12 bytes big-endian, aad = "result" or "error")
 * </pre>
 *
 * Only the client and the attested enclave can derive the key, so a reply that opens came from
 * the enclave the document describes; the counter makes dropped, replayed or reordered replies
 * fail to open.
 */
public final class ResultChannel {
    public static final String DECRYPTION_FAILED = "decryption failed: wrong key or corrupted ciphertext";
    public static final byte[] RESULT = Hpke.ascii("result");
    public static final byte[] ERROR = Hpke.ascii("error");
    private static final byte[] INFO = Hpke.ascii("cape-results-v1");
    private static final int TAG = 16;
    private static final SecureRandom RANDOM = new SecureRandom();

    private final SecretKeySpec key;

    private ResultChannel(byte[] key) {
        this.key = new SecretKeySpec(key, "ChaCha20");
    }

    /** A fresh response key pair (its public half goes into the nonce message). */
    public static X25519PrivateKeyParameters responseKey() {
        return new X25519PrivateKeyParameters(RANDOM);
    }

    /** The client's side: its response key and the attested session public key. */
    public static ResultChannel forClient(X25519PrivateKeyParameters responseKey, byte[] sessionPublic) {
        if (sessionPublic.length != Hpke.KEY_BYTES) {
            throw new KeyFormatException("the session or response key is not an X25519 public key");
        }
        byte[] shared = X25519.agree(responseKey, new X25519PublicKeyParameters(sessionPublic, 0));
        if (shared == null) {
            throw new KeyFormatException("unusable X25519 key for sealed results");
        }
        byte[] responsePublic = responseKey.generatePublicKey().getEncoded();
        HKDFBytesGenerator hkdf = new HKDFBytesGenerator(new SHA256Digest());
        hkdf.init(new HKDFParameters(shared, null, Hpke.concat(INFO, sessionPublic, responsePublic)));
        byte[] derived = new byte[32];
        hkdf.generateBytes(derived, 0, derived.length);
        return new ResultChannel(derived);
    }

    private static byte[] nonce(long sequence) {
        if (sequence < 0) {
            throw new IllegalArgumentException("sequence number out of range");
        }
        byte[] nonce = new byte[12];
        for (int i = 0; i < 8; i++) {
            nonce[11 - i] = (byte) (sequence >>> (8 * i));
        }
        return nonce;
    }

    /** Open reply {@code sequence} sealed with {@code kind} ({@link #RESULT} or {@link #ERROR}). */
    public byte[] open(long sequence, byte[] data, byte[] kind) {
        if (data.length < TAG) {
            throw new MalformedEnvelopeException("a sealed reply is shorter than its tag");
        }
        try {
            Cipher aead = Cipher.getInstance("ChaCha20-Poly1305");
            aead.init(Cipher.DECRYPT_MODE, key, new IvParameterSpec(nonce(sequence)));
            aead.updateAAD(kind);
            return aead.doFinal(data);
        } catch (AEADBadTagException e) {
            throw new DecryptionException(DECRYPTION_FAILED);
        } catch (GeneralSecurityException e) {
            throw new IllegalStateException("ChaCha20-Poly1305 is unavailable", e);
        }
    }

    /** Seal as the enclave does (tests and tools; the client only opens). */
    public byte[] seal(long sequence, byte[] data, byte[] kind) {
        try {
            Cipher aead = Cipher.getInstance("ChaCha20-Poly1305");
            aead.init(Cipher.ENCRYPT_MODE, key, new IvParameterSpec(nonce(sequence)));
            aead.updateAAD(kind);
            return aead.doFinal(data);
        } catch (GeneralSecurityException e) {
            throw new IllegalStateException("ChaCha20-Poly1305 is unavailable", e);
        }
    }
}
