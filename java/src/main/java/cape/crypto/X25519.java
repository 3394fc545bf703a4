package cape.crypto;

import java.security.MessageDigest;
import org.bouncycastle.crypto.agreement.X25519Agreement;
import org.bouncycastle.crypto.params.X25519PrivateKeyParameters;
import org.bouncycastle.crypto.params.X25519PublicKeyParameters;

/** X25519 key agreement (Bouncy Castle), refusing the all-zero secret of low-order points. */
final class X25519 {
    private X25519() {}

    /** The shared secret, or {@code null} for a low-order (unusable) peer key. */
    static byte[] agree(X25519PrivateKeyParameters mine, X25519PublicKeyParameters theirs) {
        X25519Agreement agreement = new X25519Agreement();
        agreement.init(mine);
        byte[] shared = new byte[agreement.getAgreementSize()];
        try {
            agreement.calculateAgreement(theirs, shared, 0);
        } catch (IllegalStateException e) { // Bouncy Castle refuses an all-zero result itself
            return null;
        }
        return MessageDigest.isEqual(shared, new byte[shared.length]) ? null : shared;
    }
}
